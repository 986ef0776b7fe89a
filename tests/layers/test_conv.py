"""conv and local: geometry, forward/backward against loop references, the fast path's
space-to-depth rewrite, layouts, cfg errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distconvnet.errors import ConfigError
from distconvnet.layers import conv
from layer_helpers import FakeInput, gradcheck_layer


def cfg(type_name, **keys):
    lines = ["[conv1]", f"type={type_name}", "inputs=" + keys.pop("inputs", "in")]
    return "\n".join(lines + [f"{k}={v}" for k, v in keys.items()]) + "\n"


def line_of(text, key):
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(key + "="))


def reference(xs, mats, bias, windows, modules_x, local, shared_biases=True):
    """float64 loops straight from spec §4.3/§4.5/§6.2, on the original's weight matrices:
    window m starts at -padding + m*stride; pixels outside the image read as zero."""
    n, m_x = xs[0].shape[0], modules_x
    total_filters = mats[0].shape[1]
    out = np.zeros((n, total_filters, m_x, m_x))
    for x, w, (channels, size, k, pad, stride, groups) in zip(xs, mats, windows):
        filter_channels, per_group = channels // groups, total_filters // groups
        for f in range(total_filters):
            group = f // per_group
            for my in range(m_x):
                for mx in range(m_x):
                    module_row = (my * m_x + mx) * filter_channels * k * k if local else 0
                    for c in range(filter_channels):
                        for y in range(k):
                            for xx in range(k):
                                iy, ix = -pad + my * stride + y, -pad + mx * stride + xx
                                if 0 <= iy < size and 0 <= ix < size:
                                    row = module_row + c * k * k + y * k + xx
                                    out[:, f, my, mx] += (x[:, group * filter_channels + c, iy, ix]
                                                          * w[row, f])
    if shared_biases:
        return out + bias.reshape(1, total_filters, 1, 1)
    return out + bias.reshape(1, total_filters, m_x, m_x)


def randomise_biases(layer):
    with torch.no_grad():
        layer.biases.normal_()


def ccn2_bias(layer):
    return layer.biases.detach().double().numpy().reshape(layer.ccn2_bias_shape(layer.biases.shape))


# -- geometry ---------------------------------------------------------------------------------

def test_imagenet_conv1_is_55_in_ceil_mode(make_layer):
    layer = make_layer(cfg("conv", channels=3, filters=64, filterSize=11, stride=4, initW=0.01,
                           sumWidth=3), [FakeInput(outputs=3 * 224 * 224)])
    assert (layer.channels, layer.img_size, layer.outputs) == (64, 55, 64 * 55 * 55)
    assert layer.windows[0].right_pad == 3          # 54*4 + 11 - 224 zero columns
    assert layer.init_line() == ("Initialized convolutional layer 'conv1' on GPUs 0, "
                                 "producing 55x55 64-channel output")
    assert layer(torch.randn(1, 3 * 224 * 224)).shape == (1, 64, 55, 55)


def test_cifar_conv1_keeps_24_and_channels_default_to_the_inputs(make_layer):
    layer = make_layer(cfg("conv", filters=4, filterSize=5, padding=2),
                       [FakeInput(channels=3, size=24)])
    assert (layer.channels, layer.img_size) == (4, 24)
    assert layer.sum_width is None and layer.shared_biases


def test_local_init_line(make_layer):
    layer = make_layer(cfg("local", channels=4, filters=2, filterSize=3, padding=1),
                       [FakeInput(channels=4, size=6)])
    assert layer.init_line() == ("Initialized locally-connected layer 'conv1' on GPUs 0, "
                                 "producing 6x6 2-channel output")


# -- forward against the loop reference -------------------------------------------------------

# (channels, size, filterSize, padding, stride, groups, filters, modulesX, sharedBiases)
CASES = [
    (2, 5, 3, 1, 1, 1, 3, 0, 1),    # same-size, symmetric padding
    (2, 6, 3, 0, 2, 1, 2, 0, 1),    # last window hangs one pixel past the right/bottom edge
    (4, 6, 3, 1, 2, 2, 2, 0, 0),    # overhang with padding, groups, unshared biases
    (2, 5, 3, 0, 1, 1, 2, 4, 1),    # modulesX above the auto value: an extra zero column
    (2, 5, 3, 1, 1, 1, 2, 4, 0),    # modulesX below the auto value: the right pad goes unused
]


@pytest.mark.parametrize("type_name", ["conv", "local"])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(make_layer, type_name, case):
    channels, size, k, pad, stride, groups, filters, modules_x, shared = case
    keys = dict(channels=channels, filters=filters, filterSize=k, padding=pad, stride=stride,
                groups=groups, modulesX=modules_x)
    if type_name == "conv":
        keys["sharedBiases"] = shared
    layer = make_layer(cfg(type_name, **keys), [FakeInput(channels=channels, size=size)])
    randomise_biases(layer)
    x = torch.randn(2, channels, size, size)
    expected = reference([x.double().numpy()], [layer.to_ccn2(0, layer.weights[0])],
                         ccn2_bias(layer), [(channels, size, k, pad, stride, groups)],
                         layer.img_size, local=type_name == "local",
                         shared_biases=type_name == "conv" and bool(shared))
    out = layer(x)
    assert out.shape == (2, filters * groups, layer.img_size, layer.img_size)
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x.flatten(1)), out)    # flat channel-major input


@pytest.mark.parametrize("type_name", ["conv", "local"])
def test_multi_input_sums_and_adds_one_bias(make_layer, type_name):
    # input a: 5x5 f3 p1 -> 5; input b: 7x7 f3 p0 -> 5, with 2 groups of 2 filters = 4 channels
    text = cfg(type_name, inputs="a,b", channels="2,4", filters="4,2", filterSize=3,
               padding="1,0", groups="1,2", initW="0.1,0.2")
    layer = make_layer(text, [FakeInput("a", channels=2, size=5), FakeInput("b", channels=4,
                                                                            size=7)])
    assert layer.img_size == 5 and len(layer.weights) == 2
    randomise_biases(layer)
    xa, xb = torch.randn(3, 2, 5, 5), torch.randn(3, 4 * 7 * 7)
    expected = reference([xa.double().numpy(), xb.double().numpy().reshape(3, 4, 7, 7)],
                         [layer.to_ccn2(i, w) for i, w in enumerate(layer.weights)],
                         ccn2_bias(layer), [(2, 5, 3, 1, 1, 1), (4, 7, 3, 0, 1, 2)], 5,
                         local=type_name == "local", shared_biases=type_name == "conv")
    np.testing.assert_allclose(layer(xa, xb).detach().double().numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_a_4d_input_of_other_channels_is_reinterpreted_through_its_vector(make_layer):
    layer = make_layer(cfg("conv", channels=1, filters=2, filterSize=3),
                       [FakeInput(channels=4, size=3)])         # 36 values = 1 channel of 6x6
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), layer(x.reshape(2, 1, 6, 6)))


@pytest.mark.parametrize("type_name", ["conv", "local"])
def test_gradcheck(make_layer, type_name):
    # 3x3 inputs, 2x2 windows at stride 2: the second window overhangs (right_pad = 1)
    keys = dict(inputs="a,b", channels=2, filters="1,2", groups="2,1", filterSize=2, stride=2)
    if type_name == "conv":
        keys["sharedBiases"] = 0
    layer = make_layer(cfg(type_name, **keys), [FakeInput("a", channels=2, size=3),
                                                FakeInput("b", channels=2, size=3)])
    assert layer.windows[0].right_pad == 1
    randomise_biases(layer)
    gradcheck_layer(layer, [torch.randn(2, 2, 3, 3), torch.randn(2, 18)])


# -- space-to-depth: the fast path's stride-1 form of strided convs over few channels -----------

def strided_conv(x, weight, bias, k, pad, stride, groups=1):
    """The definition (spec §6.2) in torch: window m starts at -pad + m*stride, pixels outside
    the image read as zero, M = 1 + ceil((2*pad + S - k) / stride) windows a side."""
    m_x = 1 + -(-(2 * pad + x.shape[-1] - k) // stride)
    wide = F.pad(x, (pad, pad + stride, pad, pad + stride))      # zeros past any last window
    return F.conv2d(wide, weight, bias, stride, groups=groups)[..., :m_x, :m_x]


# (channels, size, filterSize, padding, stride, groups)
SPACE_TO_DEPTH_CASES = [
    (3, 224, 11, 0, 4, 1),      # imagenet conv1: k and S not multiples of s, overhang of 3
    (3, 13, 5, 1, 2, 1),        # odd size, padding
    (2, 10, 7, 2, 3, 1),        # stride 3, padding, k = 2s + 1
    (4, 9, 3, 0, 2, 2),         # groups: each group's blocks stay together
    (1, 11, 6, 3, 4, 1),        # padding wider than the overhang
    (3, 8, 4, 0, 4, 1),         # k = s: one block per window
]


@pytest.mark.parametrize("case", SPACE_TO_DEPTH_CASES)
def test_space_to_depth_conv_equals_the_strided_conv_in_float64(make_layer, case):
    channels, size, k, pad, stride, groups = case
    keys = dict(channels=channels, filters=3, filterSize=k, padding=pad, stride=stride,
                groups=groups)
    layer = make_layer(cfg("conv", **keys), [FakeInput(channels=channels, size=size)])
    x = torch.randn(2, channels, size, size, dtype=torch.float64, requires_grad=True)
    weight = layer.weights[0].detach().double().normal_().requires_grad_()
    bias = torch.randn(3 * groups, dtype=torch.float64)
    expected = strided_conv(x, weight, bias, k, pad, stride, groups)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), upstream)
    out = conv.space_to_depth_conv(x, weight, bias, layer.windows[0])
    assert out.shape == expected.shape == (2, 3 * groups, layer.img_size, layer.img_size)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(torch.autograd.grad(out, (x, weight), upstream),
                                   expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("channels,k,stride,pays", [
    (3, 11, 4, True), (3, 7, 2, True), (3, 3, 2, True), (3, 5, 1, False),
    (16, 3, 2, False), (64, 3, 2, False), (64, 2, 2, False)])
def test_space_to_depth_is_for_strided_convs_over_few_channels(
        make_layer, channels, k, stride, pays):
    layer = make_layer(cfg("conv", channels=channels, filters=8, filterSize=k, stride=stride),
                       [FakeInput(channels=channels, size=16)])
    assert layer.windows[0].space_to_depth_pays() is pays


def test_space_to_depth_runs_under_autocast_only(make_layer, monkeypatch):
    layer = make_layer(cfg("conv", channels=3, filters=4, filterSize=11, stride=4),
                       [FakeInput(channels=3, size=32)])
    randomise_biases(layer)
    calls = []

    def spy(*args):
        calls.append(args[0].dtype)
        return space_to_depth_conv(*args)
    space_to_depth_conv = conv.space_to_depth_conv
    monkeypatch.setattr(conv, "space_to_depth_conv", spy)
    x = torch.randn(2, 3, 32, 32)
    weight, bias = layer.weights[0], layer.biases
    # --precision fp32: no autocast, the plain conv bit for bit
    assert torch.equal(layer(x), F.conv2d(layer.windows[0].padded(x), weight, bias, 4))
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert calls == [torch.bfloat16]
        monkeypatch.setattr(conv, "SPACE_TO_DEPTH", False)
        layer(x)
    assert len(calls) == 1
    expected = strided_conv(x.double(), weight.double(), bias.double(), 11, 0, 4)
    torch.testing.assert_close(out.double(), expected, rtol=0.02, atol=0.05)


# -- the original's weight-matrix layouts (spec §4.5) -----------------------------------------

def test_conv_layout_round_trip_and_element(make_layer):
    layer = make_layer(cfg("conv", channels=4, filters=3, filterSize=3, padding=1, groups=2,
                           sharedBiases=0),
                       [FakeInput(channels=4, size=5)])
    w = layer.weights[0]
    assert w.shape == (6, 2, 3, 3)
    mat = layer.to_ccn2(0, w)
    assert mat.shape == layer.ccn2_shape(0, w.shape) == (2 * 9, 6) and mat.flags.c_contiguous
    f, c, y, x = 4, 1, 2, 0
    assert mat[c * 9 + y * 3 + x, f] == w[f, c, y, x].item()
    torch.testing.assert_close(layer.from_ccn2(0, mat, w.shape), w.detach())
    assert layer.ccn2_bias_shape(layer.biases.shape) == (6 * 5 * 5, 1)
    shared = make_layer(cfg("conv", channels=4, filters=3, filterSize=3),
                        [FakeInput(channels=4, size=5)])
    assert shared.ccn2_bias_shape(shared.biases.shape) == (3, 1)


def test_local_layout_is_module_major(make_layer):
    layer = make_layer(cfg("local", channels=4, filters=3, filterSize=2, groups=2),
                       [FakeInput(channels=4, size=3)])          # M = 2, 4 modules
    w = layer.weights[0]
    assert w.shape == (4, 2, 2 * 4, 3)
    mat = layer.to_ccn2(0, w)
    assert mat.shape == layer.ccn2_shape(0, w.shape) == (4 * 4 * 2, 6)
    module, group, c, y, x, f = 3, 1, 1, 0, 1, 2
    row = module * (2 * 4) + c * 4 + y * 2 + x
    assert mat[row, group * 3 + f] == w[module, group, c * 4 + y * 2 + x, f].item()
    torch.testing.assert_close(layer.from_ccn2(0, mat, w.shape), w.detach())
    assert layer.ccn2_bias_shape(layer.biases.shape) == (6 * 2 * 2, 1)


def test_init_funcs_receive_the_original_shapes(make_layer, tmp_path, monkeypatch):
    (tmp_path / "convinit_mod.py").write_text(
        "import numpy as np\n"
        "calls = []\n"
        "def makew(name, idx, shape, params):\n"
        "    calls.append((name, idx, shape, params))\n"
        "    return np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) "
        "* float(params[0])\n"
        "def makeb(name, shape, params):\n"
        "    calls.append((name, shape))\n"
        "    return np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import convinit_mod
    layer = make_layer(cfg("conv", channels=2, filters=3, filterSize=2, sharedBiases=0,
                           initWFunc="convinit_mod.makew(0.5)",
                           initBFunc="convinit_mod.makeb()"),
                       [FakeInput(channels=2, size=3)])
    assert convinit_mod.calls == [("conv1", 0, (8, 3), ["0.5"]), ("conv1", (12, 1))]
    w = layer.weights[0]
    f, c, y, x = 2, 1, 1, 0
    assert w[f, c, y, x].item() == 0.5 * ((c * 4 + y * 2 + x) * 3 + f)
    f, my, mx = 1, 0, 1                                    # biases are filter-major
    assert layer.biases[f, my, mx].item() == f * 4 + my * 2 + mx


# -- cfg errors name file:line and the layer --------------------------------------------------

GOOD = dict(channels=4, filters=2, filterSize=3, padding=1, stride=1, groups=1)
ERRORS = [
    ("conv", dict(filters=0), "filters", "filters=0: expected >= 1"),
    ("conv", dict(filterSize=0), "filterSize", "filterSize=0: expected >= 1"),
    ("conv", dict(padding=-1), "padding", "padding=-1: expected >= 0"),
    ("conv", dict(stride=0), "stride", "stride=0: expected >= 1"),
    ("conv", dict(groups=0), "groups", "groups=0: expected >= 1"),
    ("conv", dict(channels=0), "channels", "channels=0: expected >= 1"),
    ("conv", dict(filterSize=8, padding=1), "filterSize",
     "filterSize=8 is larger than the padded input (5 + 2*1 = 7)"),
    ("local", dict(stride=4), "stride", "stride=4 exceeds filterSize=3"),
    ("conv", dict(groups=3), "groups", "channels=4 is not divisible by groups=3"),
    ("local", dict(channels=3), "channels",
     "input 'in' has 100 outputs per case, which is not channels=3 times a square image"),
    ("conv", dict(modulesX=-1), "modulesX", "modulesX=-1: expected >= 0"),
    ("conv", dict(modulesX=2, stride=2), "modulesX",
     "a 2x2 output with padding=1, stride=2, filterSize=3 does not cover the 5x5 input: "
     "-padding + stride*(modulesX-1) + filterSize = 4 < 5"),
    ("conv", dict(sumWidth=0), "sumWidth", "sumWidth=0: expected >= 1"),
    ("conv", dict(sharedBiases="maybe"), "sharedBiases", "expected a boolean"),
]


@pytest.mark.parametrize("type_name,bad,key,message", ERRORS)
def test_parse_errors_name_file_line_and_layer(make_layer, type_name, bad, key, message):
    text = cfg(type_name, **{**GOOD, **bad})
    with pytest.raises(ConfigError) as info:
        make_layer(text, [FakeInput(channels=4, size=5)])
    err = info.value
    assert (err.layer, err.line) == ("conv1", line_of(text, key))
    assert str(err).startswith(f"{err.path}:{err.line}: layer 'conv1': ")
    assert message in str(err)


def test_missing_filters_is_reported(make_layer):
    text = cfg("conv", channels=4, filterSize=3)
    with pytest.raises(ConfigError, match=r"def\d+\.cfg:1: layer 'conv1': missing required "
                                          r"key 'filters'"):
        make_layer(text, [FakeInput(channels=4, size=5)])


@pytest.mark.parametrize("type_name", ["conv", "local"])
@pytest.mark.parametrize("bad,key,message", [
    (dict(filterSize="3,1"), "filterSize", "'a': 4x5x5, 'b': 4x7x7"),
    (dict(filters="4,2"), "filters", "'a': 4x5x5, 'b': 2x5x5"),
])
def test_inputs_must_produce_the_same_output(make_layer, type_name, bad, key, message):
    text = cfg(type_name, **{**dict(inputs="a,b", channels=2, filters=4, filterSize=3,
                                    padding="1,0"), **bad})
    with pytest.raises(ConfigError) as info:
        make_layer(text, [FakeInput("a", channels=2, size=5), FakeInput("b", channels=2,
                                                                        size=7)])
    err = info.value
    assert (err.layer, err.line) == ("conv1", line_of(text, key))
    assert str(err).startswith(f"{err.path}:{err.line}: layer 'conv1': all inputs must "
                               f"produce the same output; they give {message}")


def test_per_input_errors_name_the_input(make_layer):
    text = cfg("conv", inputs="a,b", channels=2, filters=2, filterSize=3, stride="1,4")
    with pytest.raises(ConfigError, match=r":7: layer 'conv1': stride=4 \(input 'b'\) exceeds "
                                          r"filterSize=3"):
        make_layer(text, [FakeInput("a", channels=2, size=5), FakeInput("b", channels=2,
                                                                        size=5)])
