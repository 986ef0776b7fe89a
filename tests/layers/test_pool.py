"""pool and cmpool: geometry of the reference nets, forward against float64 loops over the spec's
windows (spec §4.3, §6.2), gradients by gradcheck, and one parse-error test per rule."""

import re

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError

from layer_helpers import FakeInput


def section(type_name, **keys):
    """A one-section layer-definition text for layer 'p' with input 'in'."""
    lines = ["[p]", f"type={type_name}", "inputs=in"] + [f"{k}={v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def pool_cfg(pool="max", size_x=3, stride=2, **keys):
    return section("pool", pool=pool, sizeX=size_x, stride=stride, **keys)


def assert_config_error(excinfo, text, key, *fragments):
    """The message names the cfg file, the line of `key` (or of the section) and the layer."""
    lines = text.splitlines()
    pattern = rf"\s*{key}\s*=" if key else r"\s*\["
    line = next(i for i, text_line in enumerate(lines, 1) if re.match(pattern, text_line, re.I))
    message = str(excinfo.value)
    assert re.search(rf"\.cfg:{line}: layer 'p': ", message), message
    for fragment in fragments:
        assert fragment in message, message


def distinct_values(shape, signed=True):
    """Values with distinct magnitudes at least 1/numel apart: no ties, even under gradcheck."""
    n = int(np.prod(shape))
    magnitudes = (torch.randperm(n).double() + 1) / n
    signs = torch.randint(0, 2, (n,)).double() * 2 - 1 if signed else 1.0
    return (magnitudes * signs).reshape(shape)


# -- float64 references, straight from the spec ----------------------------------------------
def window_slices(start, size, stride, count, limit):
    """Window k spans [start + k·stride, start + k·stride + size), clipped to [0, limit)."""
    return [slice(max(0, start + k * stride), min(limit, start + k * stride + size))
            for k in range(count)]


def reference_pool(x, pool, start, size_x, stride, outputs_x, summing=False):
    n, c, s, _ = x.shape
    out = np.zeros((n, c, outputs_x, outputs_x))
    windows = window_slices(start, size_x, stride, outputs_x, s)
    for i, ys in enumerate(windows):
        for j, xs in enumerate(windows):
            window = x[:, :, ys, xs].reshape(n, c, -1)
            if pool == "max":
                out[:, :, i, j] = window.max(-1)
            elif pool == "maxabs":
                pick = np.abs(window).argmax(-1)[..., None]
                out[:, :, i, j] = np.take_along_axis(window, pick, -1)[..., 0]
            else:
                out[:, :, i, j] = window.sum(-1) if summing else window.mean(-1)
    return out


def reference_cmpool(x, start, size, stride, outputs):
    groups = window_slices(start, size, stride, outputs, x.shape[1])
    return np.stack([x[:, group].max(1) for group in groups], axis=1)


# -- geometry of the reference nets (spec §14) --------------------------------------------------
@pytest.mark.parametrize("sizes", [(24, 12, 6), (55, 27, 13, 6)])
def test_reference_net_geometry_is_ceil_mode(make_layer, sizes):
    for size, expected in zip(sizes, sizes[1:]):
        layer = make_layer(pool_cfg(start=0, outputsX=0), [FakeInput(channels=16, size=size)])
        assert (layer.img_size, layer.channels, layer.outputs) == (expected, 16, 16 * expected ** 2)
        assert layer.native_padding == 0     # the common case runs torch's pooling directly
        y = layer(torch.randn(2, 16, size, size))
        assert y.shape == (2, 16, expected, expected)


@pytest.mark.parametrize("pool", ["max", "avg", "maxabs"])
def test_init_line_names_the_pool_type(make_layer, pool):
    layer = make_layer(pool_cfg(pool).replace("[p]", "[pool1]"), [FakeInput(channels=64, size=55)])
    assert layer.init_line() == (f"Initialized {pool}-pooling layer 'pool1' on GPUs 0, "
                                 f"producing 27x27 64-channel output")


# -- forward against the reference --------------------------------------------------------------
GEOMETRIES = [  # (S, sizeX, stride, start, outputsX); 0 = automatic
    (7, 3, 2, 0, 0), (8, 3, 2, 0, 0), (6, 2, 2, 0, 0), (7, 3, 3, 0, 0),   # last window clipped
    (7, 3, 2, -1, 0), (7, 4, 2, -3, 0), (6, 3, 1, -2, 0),                # negative start
    (8, 3, 2, 2, 0), (8, 3, 3, 6, 0), (8, 3, 2, 1, 4),                   # positive start
    (7, 3, 2, 0, 2), (7, 3, 2, 0, 4), (7, 4, 2, -3, 2),                  # explicit outputsX
    (5, 5, 1, 0, 0), (5, 1, 1, 0, 0),
]
KINDS = [("max", False), ("avg", False), ("avg", True), ("maxabs", False)]


def build_pool(make_layer, pool, summing, geometry, channels=3):
    s, size_x, stride, start, outputs_x = geometry
    text = pool_cfg(pool, size_x, stride, start=start, outputsX=outputs_x, sum=int(summing))
    return make_layer(text, [FakeInput(channels=channels, size=s)])


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("pool,summing", KINDS)
def test_pool_forward_matches_reference(make_layer, pool, summing, geometry):
    s, size_x, stride, start, outputs_x = geometry
    layer = build_pool(make_layer, pool, summing, geometry)
    m = outputs_x or -(-(s - start - size_x) // stride) + 1
    x = distinct_values((2, 3, s, s))
    expected = reference_pool(x.numpy(), pool, start, size_x, stride, m, summing)
    assert layer.img_size == m
    flat = layer(x.float().flatten(1))                 # (N, D) channel-major input
    np.testing.assert_allclose(flat.numpy(), expected, rtol=1e-5, atol=1e-6)
    image = layer(x.float().contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geometry", [(8, 3, 2, 0, 0), (7, 3, 2, -1, 0), (6, 3, 1, -2, 0),
                                      (8, 3, 2, 2, 0), (7, 3, 2, 0, 4)])
@pytest.mark.parametrize("pool,summing", KINDS)
def test_pool_gradcheck(make_layer, pool, summing, geometry):
    layer = build_pool(make_layer, pool, summing, geometry, channels=2)
    s = geometry[0]
    x = distinct_values((1, 2, s, s)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


def test_maxabs_keeps_the_sign_of_the_largest_magnitude(make_layer):
    layer = build_pool(make_layer, "maxabs", False, (4, 2, 2, 0, 0), channels=1)
    x = torch.tensor([[[[-5., 3., 2., -1.],
                        [1., 0., 0.5, 1.5],
                        [-0.5, -0.25, 4., 9.],
                        [-0.75, 0.1, -7., 2.]]]])
    assert layer(x).tolist() == [[[[-5., 2.], [-0.75, 9.]]]]


def test_avg_divides_by_in_image_pixels_and_sum_does_not_divide(make_layer):
    ones = torch.ones(1, 1, 8, 8)
    per_axis = torch.tensor([3., 3., 3., 2.])                  # windows 0, 2, 4, 6 of size 3
    for geometry in [(8, 3, 2, 0, 0), (8, 3, 2, 0, 4)]:
        avg = build_pool(make_layer, "avg", False, geometry, channels=1)
        assert torch.equal(avg(ones), torch.ones(1, 1, 4, 4))
        summed = build_pool(make_layer, "avg", True, geometry, channels=1)
        assert torch.equal(summed(ones)[0, 0], torch.outer(per_axis, per_axis))
    edge = build_pool(make_layer, "avg", False, (6, 3, 1, -2, 0), channels=1)   # explicit pad
    assert torch.equal(edge(torch.ones(1, 1, 6, 6)), torch.ones(1, 1, 6, 6))


def test_max_pool_gives_a_tied_window_one_gradient(make_layer):
    """Deliberate: torch's argmax routing (one input per window), not the original's copy of
    the gradient to every tied input; after a ReLU the ties are zeros whose gradient the ReLU
    stops anyway."""
    layer = build_pool(make_layer, "max", False, (4, 2, 2, 0, 0), channels=1)
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    blocks = x.grad[0, 0].reshape(2, 2, 2, 2).sum((1, 3))
    assert torch.equal(blocks, torch.ones(2, 2))


def test_pool_keeps_bfloat16(make_layer):
    for geometry in [(8, 3, 2, 0, 0), (6, 3, 1, -2, 0)]:
        for pool, summing in KINDS:
            layer = build_pool(make_layer, pool, summing, geometry)
            s = geometry[0]
            assert layer(torch.randn(2, 3, s, s).bfloat16()).dtype == torch.bfloat16


# -- cmpool -------------------------------------------------------------------------------------
def cmpool_cfg(size=2, stride=2, outputs=3, start=0):
    return section("cmpool", size=size, stride=stride, start=start, outputs=outputs)


@pytest.mark.parametrize("channels,size,stride,start,outputs",
                         [(6, 2, 2, 0, 3), (5, 3, 2, -1, 3), (7, 3, 3, 0, 3), (4, 4, 1, 0, 1),
                          (5, 2, 1, -1, 5)])
def test_cmpool_forward_and_gradcheck(make_layer, channels, size, stride, start, outputs):
    layer = make_layer(cmpool_cfg(size, stride, outputs, start),
                       [FakeInput(channels=channels, size=3)])
    assert (layer.channels, layer.img_size) == (outputs, 3)
    x = distinct_values((2, channels, 3, 3))
    expected = reference_cmpool(x.numpy(), start, size, stride, outputs)
    np.testing.assert_allclose(layer(x.float().flatten(1)).numpy(), expected, rtol=1e-6)
    assert torch.autograd.gradcheck(layer, (x[:1].requires_grad_(),))


def test_cmpool_init_line(make_layer):
    layer = make_layer(cmpool_cfg(), [FakeInput(channels=6, size=5)])
    assert layer.init_line() == ("Initialized cross-map max-pooling layer 'p' on GPUs 0, "
                                 "producing 5x5 3-channel output")


# -- parse errors -------------------------------------------------------------------------------
POOL_ERRORS = [  # (cfg text, key, fragment), input 3 channels of 6x6
    (pool_cfg("min"), "pool", "expected one of max, avg, maxabs"),
    (pool_cfg(size_x=0), "sizeX", "between 1 and the input size 6"),
    (pool_cfg(size_x=7), "sizeX", "between 1 and the input size 6"),
    (pool_cfg(stride=0), "stride", "between 1 and sizeX=3"),
    (pool_cfg(stride=4), "stride", "between 1 and sizeX=3"),
    (pool_cfg(start=-3), "start", "expected between -2 and 5"),
    (pool_cfg(start=6), "start", "expected between -2 and 5"),
    (pool_cfg(size_x=3, stride=1, start=5), "start", "leave no output window"),
    (pool_cfg(outputsX=-1), "outputsX", ">= 0 (0 = automatic)"),
    (pool_cfg(outputsX=4), "outputsX", "would start at pixel 6"),
    (pool_cfg("max", sum=1), "sum", "only to pool=avg"),
    (pool_cfg(channels=5), "channels", "not channels=5 times a square image"),
    (pool_cfg().replace("sizeX=3", ""), None, "missing required key 'sizeX'"),
]


@pytest.mark.parametrize("text,key,fragment", POOL_ERRORS)
def test_pool_parse_errors(make_layer, text, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(text, [FakeInput(channels=3, size=6)])
    assert_config_error(excinfo, text, key, fragment)


CMPOOL_ERRORS = [  # input 6 channels
    (cmpool_cfg(size=7), "size", "between 1 and channels=6"),
    (cmpool_cfg(size=0), "size", "between 1 and channels=6"),
    (cmpool_cfg(stride=3), "stride", "between 1 and size=2"),
    (cmpool_cfg(start=1), "start", "between -1 and 0"),
    (cmpool_cfg(start=-2), "start", "between -1 and 0"),
    (cmpool_cfg(outputs=0), "outputs", "positive number of output channels"),
    (cmpool_cfg(outputs=2), "outputs", "cover only 4 of 6 input channels"),
    (cmpool_cfg(outputs=4), "outputs", "would start at map 6"),
    (cmpool_cfg().replace("outputs=3", ""), None, "missing required key 'outputs'"),
    (cmpool_cfg() + "pool=avg\n", "pool", "supports only max"),
]


@pytest.mark.parametrize("text,key,fragment", CMPOOL_ERRORS)
def test_cmpool_parse_errors(make_layer, text, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(text, [FakeInput(channels=6, size=4)])
    assert_config_error(excinfo, text, key, fragment)
