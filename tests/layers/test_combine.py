"""concat, pass, eltsum and eltmax against float64 references (spec §4.3), gradients, geometry,
and their cfg errors."""

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError
from layer_helpers import FakeInput, check_error


def cfg(type_name, inputs="a,b", **keys):
    lines = ["[mix]", f"type={type_name}", f"inputs={inputs}"]
    return "\n".join(lines + [f"{k}={v}" for k, v in keys.items()]) + "\n"


def vectors(*xs):
    """Each case as the original's channel-major vector."""
    return [x.detach().numpy().reshape(x.shape[0], -1) for x in xs]


# -- concat and pass -------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["concat", "pass"])
def test_images_of_one_size_concatenate_along_channels(make_layer, type_name):
    layer = make_layer(cfg(type_name), [FakeInput("a", channels=2, size=3),
                                        FakeInput("b", channels=5, size=3)])
    assert (layer.channels, layer.img_size, layer.outputs) == (7, 3, 63)
    a, b = torch.randn(4, 2, 3, 3), torch.randn(4, 5, 3, 3)
    out = layer(a, b)
    assert out.shape == (4, 7, 3, 3)
    np.testing.assert_array_equal(out.reshape(4, -1).numpy(), np.concatenate(vectors(a, b), 1))


@pytest.mark.parametrize("type_name", ["concat", "pass"])
def test_mixed_inputs_concatenate_flat(make_layer, type_name):
    inputs = [FakeInput("a", channels=2, size=3), FakeInput("b", outputs=5),
              FakeInput("c", channels=1, size=2)]
    layer = make_layer(cfg(type_name, "a,b,c"), inputs)
    assert (layer.channels, layer.outputs) == (None, 18 + 5 + 4)
    a, b, c = torch.randn(3, 2, 3, 3), torch.randn(3, 5), torch.randn(3, 1, 2, 2)
    out = layer(a, b, c)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(vectors(a, b, c), 1))
    assert layer.init_line().endswith("producing 27 outputs")


@pytest.mark.parametrize("type_name", ["concat", "pass"])
def test_concatenation_gradcheck(make_layer, type_name):
    layer = make_layer(cfg(type_name), [FakeInput("a", channels=2, size=2),
                                        FakeInput("b", outputs=3)])
    a = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (a, b))


def test_descriptions(make_layer):
    inputs = [FakeInput("a", outputs=4), FakeInput("b", outputs=6)]
    assert make_layer(cfg("concat"), inputs).init_line() == (
        "Initialized concatenation layer 'mix' on GPUs 0, producing 10 outputs")
    assert make_layer(cfg("pass"), inputs).init_line() == (
        "Initialized pass-through layer 'mix' on GPUs 0, producing 10 outputs")


def test_pass_needs_the_replica_count_of_its_inputs(make_layer):
    inputs = [FakeInput("a", outputs=4, gpus=(0, 1)), FakeInput("b", outputs=4, gpus=(0, 1))]
    assert make_layer(cfg("pass"), inputs).gpus == [0, 1]
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cfg("pass", gpu=0), inputs)
    check_error(excinfo, 4, "mix", "as many replicas as its inputs")


# -- eltsum ----------------------------------------------------------------------------------

def test_eltsum_weighs_by_the_params_file_coeffs(make_layer):
    inputs = [FakeInput(n, channels=3, size=2) for n in "abc"]
    layer = make_layer(cfg("eltsum", "a,b,c"), inputs, "[mix]\ncoeffs=2,-0.5,0.25\n")
    xs = [torch.randn(4, 3, 2, 2, dtype=torch.float64) for _ in range(3)]
    a, b, c = (x.numpy() for x in xs)
    out = layer(*xs)
    assert out.shape == (4, 3, 2, 2)
    np.testing.assert_allclose(out.numpy(), 2 * a - 0.5 * b + 0.25 * c, rtol=1e-14)
    xs = [x.requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(layer, tuple(xs))


def test_eltsum_coeffs_default_to_one_and_one_value_is_broadcast(make_layer):
    inputs = [FakeInput("a", outputs=6), FakeInput("b", outputs=6)]
    assert make_layer(cfg("eltsum"), inputs, "[mix]\n").coeffs == [1.0, 1.0]
    assert make_layer(cfg("eltsum"), inputs, "[mix]\ncoeffs=3\n").coeffs == [3.0, 3.0]


def test_eltsum_ignores_coeffs_in_the_definition_file(make_layer):
    """spec §15.10: the wiki puts coeffs in the definition file, where the original ignores it."""
    inputs = [FakeInput("a", outputs=6), FakeInput("b", outputs=6)]
    layer = make_layer(cfg("eltsum", coeffs="1,-1"), inputs, "[mix]\n")
    assert layer.coeffs == [1.0, 1.0]


def test_eltsum_of_an_image_and_a_flat_input_keeps_the_first_shape(make_layer):
    layer = make_layer(cfg("eltsum"), [FakeInput("a", channels=2, size=2),
                                       FakeInput("b", outputs=8)], "[mix]\ncoeffs=1,-1\n")
    a, b = torch.randn(3, 2, 2, 2), torch.randn(3, 8)
    out = layer(a, b)
    assert out.shape == (3, 2, 2, 2)
    np.testing.assert_allclose(out.reshape(3, -1).numpy(), vectors(a)[0] - b.numpy(), rtol=1e-6)
    assert layer.init_line() == ("Initialized elementwise sum layer 'mix' on GPUs 0, "
                                 "producing 8 outputs")


@pytest.mark.parametrize("params, line, words", [
    ("[mix]\ncoeffs=1,2,3\n", 2, "expected 1 or 2 comma-separated values"),
    ("[mix]\n\ncoeffs=1,x\n", 3, "coeffs='x': expected a number"),
])
def test_eltsum_bad_coeffs(make_layer, params, line, words):
    inputs = [FakeInput("a", outputs=6), FakeInput("b", outputs=6)]
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cfg("eltsum"), inputs, params)
    check_error(excinfo, line, "mix", words)


def test_eltsum_requires_a_params_section(make_layer):
    layer = make_layer(cfg("eltsum"), [FakeInput("a", outputs=6), FakeInput("b", outputs=6)])
    assert layer.needs_params
    with pytest.raises(ConfigError, match="layer 'mix': .*requires extra parameters"):
        layer.read_params(None, "params.cfg")


# -- eltmax ----------------------------------------------------------------------------------

def test_eltmax_matches_numpy_and_gradchecks(make_layer):
    layer = make_layer(cfg("eltmax", "a,b,c"), [FakeInput(n, outputs=10) for n in "abc"])
    xs = [torch.randn(4, 10, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    expected = np.maximum(np.maximum(*vectors(xs[0], xs[1])), vectors(xs[2])[0])
    np.testing.assert_array_equal(layer(*xs).detach().numpy(), expected)
    assert torch.autograd.gradcheck(layer, tuple(xs))
    assert layer.init_line() == ("Initialized elementwise max layer 'mix' on GPUs 0, "
                                 "producing 10 outputs")


def test_eltmax_gives_every_tied_input_the_whole_gradient(make_layer):
    """The original's kEltwiseMaxGrad: grad · (input == output), not split between ties."""
    layer = make_layer(cfg("eltmax"), [FakeInput("a", outputs=3), FakeInput("b", outputs=3)])
    a = torch.tensor([[1.0, 2.0, 5.0]], requires_grad=True)
    b = torch.tensor([[1.0, 3.0, 4.0]], requires_grad=True)
    layer(a, b).backward(torch.tensor([[10.0, 20.0, 30.0]]))
    assert a.grad.tolist() == [[10.0, 0.0, 30.0]]
    assert b.grad.tolist() == [[10.0, 20.0, 0.0]]


def test_eltmax_needs_two_inputs(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cfg("eltmax", "a"), [FakeInput("a", outputs=3)])
    check_error(excinfo, 3, "mix", "at least 2 inputs, got 1")


@pytest.mark.parametrize("type_name", ["eltsum", "eltmax"])
def test_elementwise_inputs_must_have_equal_dimensions(make_layer, type_name):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cfg(type_name), [FakeInput("a", outputs=6), FakeInput("b", outputs=8)])
    check_error(excinfo, 3, "mix", "same dimensionality, got 6, 8")
