"""fc and sfc: forward/backward against float64 references, layouts, init funcs, cfg errors."""

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError
from layer_helpers import FakeInput, gradcheck_layer


def cfg(type_name, **keys):
    lines = ["[fc1]", f"type={type_name}", "inputs=" + keys.pop("inputs", "in")]
    return "\n".join(lines + [f"{k}={v}" for k, v in keys.items()]) + "\n"


def line_of(text, key):
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(key + "="))


def randomise_biases(layer):
    with torch.no_grad():
        layer.biases.normal_()


def ccn2_bias_row(layer):
    return layer.biases.detach().double().numpy().reshape(layer.ccn2_bias_shape(
        layer.biases.shape))


def as_rows(x):
    """A case's channel-major vector (spec §4.3), in float64."""
    return x.double().numpy().reshape(x.shape[0], -1)


# -- fc ---------------------------------------------------------------------------------------

def test_fc_sums_inputs_times_their_matrices_plus_one_bias(make_layer):
    layer = make_layer(cfg("fc", inputs="a,b", outputs=5, initW="0.1,0.3", initB=1),
                       [FakeInput("a", channels=2, size=2), FakeInput("b", outputs=3)])
    assert layer.outputs == 5 and layer.is_image is False
    assert layer.init_line() == ("Initialized fully-connected layer 'fc1' on GPUs 0, "
                                 "producing 5 outputs")
    assert torch.equal(layer.biases, torch.ones(5))
    randomise_biases(layer)
    xa, xb = torch.randn(4, 2, 2, 2), torch.randn(4, 3)
    mats = [layer.to_ccn2(i, w).astype(np.float64) for i, w in enumerate(layer.weights)]
    expected = np.zeros((4, 5))
    for x, mat in zip((as_rows(xa), as_rows(xb)), mats):
        for n in range(4):
            for o in range(5):
                expected[n, o] += sum(x[n, i] * mat[i, o] for i in range(mat.shape[0]))
    expected += ccn2_bias_row(layer)
    np.testing.assert_allclose(layer(xa, xb).detach().double().numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_fc_gradcheck(make_layer):
    layer = make_layer(cfg("fc", inputs="a,b", outputs=3),
                       [FakeInput("a", channels=1, size=2), FakeInput("b", outputs=2)])
    randomise_biases(layer)
    gradcheck_layer(layer, [torch.randn(2, 1, 2, 2), torch.randn(2, 2)])


def test_fc_layout_is_inputs_by_outputs(make_layer):
    layer = make_layer(cfg("fc", outputs=4), [FakeInput(outputs=6)])
    w = layer.weights[0]
    mat = layer.to_ccn2(0, w)
    assert mat.shape == layer.ccn2_shape(0, w.shape) == (6, 4) and mat.flags.f_contiguous
    i, o = 5, 2
    assert mat[i, o] == w[o, i].item()
    torch.testing.assert_close(layer.from_ccn2(0, mat, w.shape), w.detach())
    assert layer.ccn2_bias_shape(layer.biases.shape) == (1, 4)
    mat[0, 0] = 123.0                                    # a copy, never the live weights
    assert w[0, 0].item() != 123.0


def test_fc_init_funcs_get_the_original_shapes(make_layer, tmp_path, monkeypatch):
    (tmp_path / "fcinit_mod.py").write_text(
        "import numpy as np\n"
        "calls = []\n"
        "def makew(name, idx, shape, params):\n"
        "    calls.append((name, idx, shape, params))\n"
        "    return np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) + idx\n"
        "def makeb(name, shape, params):\n"
        "    calls.append((name, shape, params))\n"
        "    return np.full(shape, float(params[0]), dtype=np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fcinit_mod
    layer = make_layer(cfg("fc", inputs="a,b", outputs=3, initWFunc="fcinit_mod.makew()",
                           initBFunc="fcinit_mod.makeb(2.5)"),
                       [FakeInput("a", outputs=4), FakeInput("b", outputs=2)])
    assert fcinit_mod.calls == [("fc1", 0, (4, 3), []), ("fc1", 1, (2, 3), []),
                                ("fc1", (1, 3), ["2.5"])]
    i, o = 3, 1
    assert layer.weights[0][o, i].item() == i * 3 + o
    assert layer.weights[1][o, 1].item() == 1 * 3 + o + 1
    assert torch.equal(layer.biases, torch.full((3,), 2.5))


# -- sfc --------------------------------------------------------------------------------------

def block_diagonal(mat, parts):
    """The full (inputs, parts·outputs) matrix that the original's row blocks stand for."""
    rows, cols = mat.shape[0] // parts, mat.shape[1]
    full = np.zeros((mat.shape[0], parts * cols))
    for p in range(parts):
        full[p * rows:(p + 1) * rows, p * cols:(p + 1) * cols] = mat[p * rows:(p + 1) * rows]
    return full


def test_sfc_is_block_diagonal_and_sums_inputs(make_layer):
    layer = make_layer(cfg("sfc", inputs="a,b", parts=3, outputs=2, initW=0.2),
                       [FakeInput("a", channels=3, size=2), FakeInput("b", outputs=6)])
    assert layer.outputs == 6
    assert layer.init_line() == ("Initialized split fully-connected layer 'fc1' on GPUs 0, "
                                 "producing 6 outputs in 3 parts")
    randomise_biases(layer)
    xa, xb = torch.randn(4, 3, 2, 2), torch.randn(4, 6)
    expected = ccn2_bias_row(layer).copy()
    for x, (i, w) in zip((xa, xb), enumerate(layer.weights)):
        expected = expected + as_rows(x) @ block_diagonal(layer.to_ccn2(i, w).astype(np.float64),
                                                          3)
    np.testing.assert_allclose(layer(xa, xb).detach().double().numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_sfc_gradcheck(make_layer):
    layer = make_layer(cfg("sfc", inputs="a,b", parts=2, outputs=2),
                       [FakeInput("a", outputs=4), FakeInput("b", channels=1, size=2)])
    randomise_biases(layer)
    gradcheck_layer(layer, [torch.randn(3, 4), torch.randn(3, 1, 2, 2)])


def test_sfc_layout_stacks_the_diagonal_blocks(make_layer):
    layer = make_layer(cfg("sfc", parts=2, outputs=3), [FakeInput(outputs=8)])
    w = layer.weights[0]
    assert w.shape == (2, 4, 3)
    mat = layer.to_ccn2(0, w)
    assert mat.shape == layer.ccn2_shape(0, w.shape) == (8, 3)
    part, row, o = 1, 2, 0
    assert mat[part * 4 + row, o] == w[part, row, o].item()
    torch.testing.assert_close(layer.from_ccn2(0, mat, w.shape), w.detach())
    assert layer.ccn2_bias_shape(layer.biases.shape) == (1, 6)


# -- cfg errors name file:line and the layer --------------------------------------------------

@pytest.mark.parametrize("type_name,keys,key,message", [
    ("fc", dict(outputs=0), "outputs", "outputs=0: expected >= 1"),
    ("fc", dict(outputs="ten"), "outputs", "outputs='ten': expected an integer"),
    ("fc", dict(outputs=2, initW="0.1,0.2,0.3"), "initW",
     "expected 1 or 2 comma-separated values (one per input), got 3"),
    ("sfc", dict(parts=0, outputs=2), "parts", "parts=0: expected >= 1"),
    ("sfc", dict(parts=2, outputs=0), "outputs", "outputs=0: expected >= 1"),
    ("sfc", dict(parts=4, outputs=2), "parts",
     "input 'b' has 6 outputs per case, which is not divisible by parts=4"),
])
def test_parse_errors_name_file_line_and_layer(make_layer, type_name, keys, key, message):
    text = cfg(type_name, inputs="a,b", **keys)
    with pytest.raises(ConfigError) as info:
        make_layer(text, [FakeInput("a", outputs=8), FakeInput("b", outputs=6)])
    err = info.value
    assert (err.layer, err.line) == ("fc1", line_of(text, key))
    assert str(err).startswith(f"{err.path}:{err.line}: layer 'fc1': ")
    assert message in str(err)


@pytest.mark.parametrize("type_name", ["fc", "sfc"])
def test_missing_outputs_is_reported(make_layer, type_name):
    text = cfg(type_name, parts=2) if type_name == "sfc" else cfg(type_name)
    with pytest.raises(ConfigError, match=r"def\d+\.cfg:1: layer 'fc1': missing required "
                                          r"key 'outputs'"):
        make_layer(text, [FakeInput(outputs=4)])
