"""cmrnorm, rnorm, cnorm: forward against float64 loops over the formulas of spec §6.1, gradients
by gradcheck, the params-file keys of spec §5, and one parse-error test per rule."""

import re

import numpy as np
import pytest
import torch

from layer_helpers import FakeInput
from distconvnet.cfg import read_cfg
from distconvnet.errors import ConfigError

PARAMS = "[p]\nscale=0.5\npow=0.75\nminDiv=2\n"
SCALE, POW, MIN_DIV = 0.5, 0.75, 2.0


def section(type_name, **keys):
    """A one-section layer-definition text for layer 'p' with input 'in'."""
    lines = ["[p]", f"type={type_name}", "inputs=in"] + [f"{k}={v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def assert_config_error(excinfo, text, key, *fragments):
    """The message names the cfg file, the line of `key` (or of the section) and the layer."""
    pattern = rf"\s*{key}\s*=" if key else r"\s*\["
    line = next(i for i, text_line in enumerate(text.splitlines(), 1)
                if re.match(pattern, text_line, re.I))
    message = str(excinfo.value)
    assert re.search(rf"\.cfg:{line}: layer 'p': ", message), message
    for fragment in fragments:
        assert fragment in message, message


# -- float64 references, straight from spec §6.1 ------------------------------------------------
def clipped(centre, size, limit):
    """The window of `size` starting at centre − ⌊size/2⌋, clipped to [0, limit)."""
    first = centre - size // 2
    return slice(max(0, first), min(limit, first + size))


def reference_cmrnorm(x, size, blocked=False):
    out = np.empty_like(x)
    channels = x.shape[1]
    for f in range(channels):
        if blocked:
            first = f // size * size
            window = slice(first, min(channels, first + size))
        else:
            window = clipped(f, size, channels)
        total = (x[:, window] ** 2).sum(1)
        out[:, f] = x[:, f] * (MIN_DIV + SCALE / size * total) ** -POW
    return out


def spatial_windows(s, size):
    return [[(clipped(y, size, s), clipped(x, size, s)) for x in range(s)] for y in range(s)]


def reference_rnorm(x):
    size = reference_rnorm.size
    out = np.empty_like(x)
    for y, row in enumerate(spatial_windows(x.shape[-1], size)):
        for x_, (ys, xs) in enumerate(row):
            total = (x[:, :, ys, xs] ** 2).sum((-1, -2))
            out[:, :, y, x_] = x[:, :, y, x_] * (MIN_DIV + SCALE / size ** 2 * total) ** -POW
    return out


def reference_cnorm(x):
    size = reference_cnorm.size
    windows = spatial_windows(x.shape[-1], size)
    means = np.empty_like(x)
    for y, row in enumerate(windows):
        for x_, (ys, xs) in enumerate(row):
            means[:, :, y, x_] = x[:, :, ys, xs].mean((-1, -2))     # in-image pixels only
    diffs = x - means
    out = np.empty_like(x)
    for y, row in enumerate(windows):
        for x_, (ys, xs) in enumerate(row):
            total = (diffs[:, :, ys, xs] ** 2).sum((-1, -2))
            out[:, :, y, x_] = x[:, :, y, x_] * (MIN_DIV + SCALE / size ** 2 * total) ** -POW
    return out


def spatial_reference(kind, x, size):
    function = reference_rnorm if kind == "rnorm" else reference_cnorm
    function.size = size
    return function(x)


def check(layer, x, expected):
    """Flat and channels-last inputs both give the reference (float32 against float64)."""
    for shaped in (x.float().flatten(1), x.float().contiguous(memory_format=torch.channels_last)):
        np.testing.assert_allclose(layer(shaped).numpy(), expected, rtol=2e-5, atol=1e-6)


# -- cmrnorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size,blocked", [(8, 5, 0), (7, 4, 0), (5, 2, 0), (6, 6, 0),
                                                   (8, 4, 1), (7, 3, 1), (5, 5, 1)])
def test_cmrnorm_matches_reference_and_gradcheck(make_layer, channels, size, blocked):
    layer = make_layer(section("cmrnorm", size=size, blocked=blocked),
                       [FakeInput(channels=channels, size=3)], PARAMS)
    x = torch.randn(2, channels, 3, 3, dtype=torch.float64) * 2
    check(layer, x, reference_cmrnorm(x.numpy(), size, bool(blocked)))
    assert torch.autograd.gradcheck(layer, (x[:1].requires_grad_(),))


def test_cmrnorm_is_torch_local_response_norm(make_layer):
    """The non-blocked formula is exactly torch's LRN with alpha=scale, beta=pow, k=minDiv."""
    layer = make_layer(section("cmrnorm", size=5), [FakeInput(channels=8, size=4)], PARAMS)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    lrn = torch.nn.functional.local_response_norm(x, 5, alpha=SCALE, beta=POW, k=MIN_DIV)
    torch.testing.assert_close(layer(x), lrn)


@pytest.mark.parametrize("size,layout", [(5, torch.contiguous_format), (4, torch.channels_last)])
def test_cmrnorm_gradient_is_torch_local_response_norms(make_layer, size, layout):
    """The hand-written backward against autograd through torch's LRN, on a bigger input than
    gradcheck's and in both memory layouts."""
    layer = make_layer(section("cmrnorm", size=size), [FakeInput(channels=16, size=6)], PARAMS)
    x = (torch.randn(3, 16, 6, 6, dtype=torch.float64) * 2).contiguous(memory_format=layout)
    upstream = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    ours = torch.autograd.grad(layer(x.requires_grad_()), x, upstream)[0]
    lrn = torch.nn.functional.local_response_norm(x, size, alpha=SCALE, beta=POW, k=MIN_DIV)
    torch.testing.assert_close(ours, torch.autograd.grad(lrn, x, upstream)[0])


@pytest.mark.parametrize("kind", ["cmrnorm", "rnorm"])
def test_response_norms_trace_into_one_graph(make_layer, kind):
    """torch.compile (the GPU default) captures the layer whole, and its path (the formula
    over average pools) has the eager path's (the hand-written backward's) values and gradient."""
    layer = make_layer(section(kind, size=3), [FakeInput(channels=4, size=5)], PARAMS)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(eager_x).square().sum().backward()
    out = compiled(compiled_x)
    out.square().sum().backward()
    torch.testing.assert_close(out, layer(x))
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.mark.parametrize("kind,channels,size,blocked", [
    ("cmrnorm", 8, 5, 0), ("cmrnorm", 7, 4, 0), ("cmrnorm", 7, 3, 1), ("rnorm", 4, 3, 0),
    ("rnorm", 4, 4, 0)])
def test_compiled_formula_matches_reference_and_gradcheck(make_layer, kind, channels, size,
                                                          blocked):
    """Under torch.compile the response norms take the formula path: the same float64
    references, in both memory layouts, and gradcheck."""
    keys = {"blocked": blocked} if kind == "cmrnorm" else {}
    layer = make_layer(section(kind, size=size, **keys), [FakeInput(channels=channels, size=5)],
                       PARAMS)
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64) * 2
    expected = reference_cmrnorm(x.numpy(), size, bool(blocked)) if kind == "cmrnorm" \
        else spatial_reference(kind, x.numpy(), size)
    torch._dynamo.reset()
    check(torch.compile(layer, backend="eager", fullgraph=True), x, expected)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.autograd.gradcheck(compiled, (x[:1].requires_grad_(),))


def test_imagenet_rnorm1_init_line_and_shape(make_layer):
    text = section("cmrnorm", channels=64, size=5).replace("[p]", "[rnorm1]")
    layer = make_layer(text, [FakeInput(channels=64, size=55)], "[rnorm1]\nscale=0.0001\n"
                       "pow=0.75\nminDiv=2\n")
    assert layer.init_line() == ("Initialized cross-map response-normalization layer 'rnorm1' "
                                 "on GPUs 0, producing 55x55 64-channel output")
    assert layer(torch.randn(1, 64 * 55 * 55)).shape == (1, 64, 55, 55)


# -- rnorm and cnorm ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnorm", "cnorm"])
@pytest.mark.parametrize("s,size", [(5, 3), (6, 4), (4, 1), (4, 4), (5, 5)])
def test_spatial_norms_match_reference_and_gradcheck(make_layer, kind, s, size):
    layer = make_layer(section(kind, size=size), [FakeInput(channels=2, size=s)], PARAMS)
    x = torch.randn(2, 2, s, s, dtype=torch.float64) * 2 + 0.5
    check(layer, x, spatial_reference(kind, x.numpy(), size))
    assert torch.autograd.gradcheck(layer, (x[:1].requires_grad_(),))


def original_cnorm_gradient(x, grad, size, scale, power, min_div):
    """The original's cnorm backward (ResponseNormUndo fed the mean differences): each pixel's
    window mean counts as a constant, so the gradient reaching x_j through the means is missing:
    g_j·D_j^(−pow) − 2·(scale/size²)·pow·d_j·Σ_{f: j ∈ W(f)} g_f·out_f / D_f."""
    windows = spatial_windows(x.shape[-1], size)
    diffs, denominators = np.empty_like(x), np.empty_like(x)
    for y, row in enumerate(windows):
        for x_, (ys, xs) in enumerate(row):
            diffs[:, :, y, x_] = x[:, :, y, x_] - x[:, :, ys, xs].mean((-1, -2))
    for y, row in enumerate(windows):
        for x_, (ys, xs) in enumerate(row):
            total = (diffs[:, :, ys, xs] ** 2).sum((-1, -2))
            denominators[:, :, y, x_] = min_div + scale / size ** 2 * total
    out = x * denominators ** -power
    spread = np.zeros_like(x)
    for y, row in enumerate(windows):
        for x_, (ys, xs) in enumerate(row):
            spread[:, :, ys, xs] += (grad * out / denominators)[:, :, y:y + 1, x_:x_ + 1]
    return grad * denominators ** -power - 2 * scale / size ** 2 * power * diffs * spread


def test_cnorm_backward_is_the_exact_gradient_not_the_originals(make_layer):
    """What layers/README.md says of cnorm, measured: ours (the exact gradient of the forward
    both share, gradchecked above) and the original's differ at nearly every entry, by about 20%
    of the largest entry with size=3 on N(0, 100²) input."""
    torch.manual_seed(0)
    params = "[p]\nscale=0.001\npow=0.75\n"
    layer = make_layer(section("cnorm", size=3), [FakeInput(channels=16, size=12)], params)
    x = (torch.randn(8, 16, 12, 12, dtype=torch.float64) * 100).requires_grad_()
    grad = torch.randn(8, 16, 12, 12, dtype=torch.float64)
    ours, = torch.autograd.grad(layer(x), x, grad)
    original = original_cnorm_gradient(x.detach().numpy(), grad.numpy(), 3, 0.001, 0.75, 1.0)
    ours = ours.numpy()
    difference = np.abs(ours - original)
    assert 0.15 < difference.max() / np.abs(ours).max() < 0.25
    assert (difference > 1e-3 * np.abs(ours)).mean() > 0.95


@pytest.mark.parametrize("kind,words", [("cmrnorm", "cross-map response-normalization"),
                                        ("rnorm", "response-normalization"),
                                        ("cnorm", "contrast-normalization")])
def test_init_lines(make_layer, kind, words):
    layer = make_layer(section(kind, size=3), [FakeInput(channels=4, size=6)], PARAMS)
    assert layer.init_line() == (f"Initialized {words} layer 'p' on GPUs 0, "
                                 f"producing 6x6 4-channel output")
    assert layer.needs_params


@pytest.mark.parametrize("kind", ["cmrnorm", "rnorm", "cnorm"])
def test_norms_keep_bfloat16(make_layer, kind):
    layer = make_layer(section(kind, size=3), [FakeInput(channels=4, size=5)], PARAMS)
    x = torch.randn(2, 4, 5, 5).bfloat16()
    for layout in (torch.contiguous_format, torch.channels_last):
        assert layer(x.contiguous(memory_format=layout)).dtype == torch.bfloat16


# -- params file --------------------------------------------------------------------------------
def test_min_div_defaults_to_one_and_params_can_change_on_resume(make_layer, tmp_path):
    layer = make_layer(section("rnorm", size=3), [FakeInput(channels=1, size=4)],
                       "[p]\nscale=0.5\npow=0.75\n")
    assert (layer.scale, layer.pow, layer.min_div) == (0.5, 0.75, 1.0)
    x = torch.randn(1, 1, 4, 4)
    before = layer(x)
    resumed = tmp_path / "resumed-params.cfg"
    resumed.write_text("[p]\nscale=0\npow=1\nminDiv=4\n")
    layer.set_params(read_cfg(str(resumed)).sections[0])
    assert (layer.scale, layer.pow, layer.min_div) == (0.0, 1.0, 4.0)
    torch.testing.assert_close(layer(x), x / 4)
    assert not torch.allclose(before, x / 4)


PARAM_ERRORS = [  # (params text, key, fragment)
    ("[p]\npow=0.75\n", None, "missing required key 'scale'"),
    ("[p]\nscale=0.5\n", None, "missing required key 'pow'"),
    ("[p]\nscale=-0.5\npow=0.75\n", "scale", "scale=-0.5: expected >= 0"),
    ("[p]\nscale=0.5\npow=-1\n", "pow", "pow=-1.0: expected >= 0"),
    ("[p]\nscale=0.5\npow=0.75\nminDiv=0\n", "minDiv", "minDiv=0: expected a positive number"),
    ("[p]\nscale=big\npow=0.75\n", "scale", "expected a number"),
]


@pytest.mark.parametrize("params,key,fragment", PARAM_ERRORS)
def test_param_errors(make_layer, params, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(section("cmrnorm", size=3), [FakeInput(channels=4, size=3)], params)
    assert_config_error(excinfo, params, key, fragment)


def test_missing_params_section_names_the_layer(make_layer):
    layer = make_layer(section("cnorm", size=3), [FakeInput(channels=4, size=3)])
    with pytest.raises(ConfigError, match=r"layer 'p': layer of type 'cnorm' requires extra"):
        layer.read_params(None, "params.cfg")


# -- parse errors -------------------------------------------------------------------------------
DEF_ERRORS = [  # (cfg text, key, fragment), input 4 channels of 5x5
    (section("cmrnorm", size=1), "size", "size=1: expected between 2 and channels=4"),
    (section("cmrnorm", size=5), "size", "size=5: expected between 2 and channels=4"),
    (section("rnorm", size=0), "size", "size=0: expected between 1 and the input size 5"),
    (section("rnorm", size=6), "size", "size=6: expected between 1 and the input size 5"),
    (section("cnorm", size=6), "size", "size=6: expected between 1 and the input size 5"),
    (section("cnorm"), None, "missing required key 'size'"),
    (section("cmrnorm", size=3, blocked="maybe"), "blocked", "expected a boolean"),
    (section("rnorm", size=3, channels=3), "channels", "not channels=3 times a square image"),
]


@pytest.mark.parametrize("text,key,fragment", DEF_ERRORS)
def test_definition_errors(make_layer, text, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(text, [FakeInput(channels=4, size=5)])
    assert_config_error(excinfo, text, key, fragment)
