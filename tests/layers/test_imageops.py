"""Image-processing layers: forward against float64 references written from the original's
formulas (spec §4.3, layer.py, conv_util.cu), gradients, geometry, startup lines and cfg errors."""

import math
import textwrap

import numpy as np
import pytest
import torch
from layer_helpers import FakeInput

from distconvnet.errors import ConfigError


def images(n, c, s, low=-1.0, high=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, c, s, s, dtype=torch.float64, generator=gen)


def assert_close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=tol, atol=tol)


def gradcheck(layer, x):
    """Full Jacobian check on the first case only: the layers treat cases independently."""
    x = x[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


def expect_error(make_layer, text, inputs, key, *words):
    """The ConfigError names the cfg file, the line of `key` and the layer, plus `words`."""
    with pytest.raises(ConfigError) as info:
        make_layer(text, inputs)
    err, lines = info.value, textwrap.dedent(text).splitlines()
    line = next(i for i, text_line in enumerate(lines, 1)
                if text_line.lower().startswith(key.lower() + "="))
    name = lines[0].strip("[]")
    assert str(err).startswith(f"{err.path}:{line}: layer '{name}': "), str(err)
    assert err.path.endswith(".cfg")
    for word in words:
        assert word in str(err), str(err)


# -- blur ------------------------------------------------------------------------------------
def blur_reference(x, filter_size, stdev):
    """Zero-padded separable correlation with taps exp(-(fs//2 - i)^2 / (2 sd^2)) / sum."""
    centre = filter_size // 2
    taps = np.array([math.exp(-(centre - i) ** 2 / (2 * stdev ** 2)) for i in range(filter_size)])
    taps /= taps.sum()
    x = x.numpy()
    size = x.shape[-1]
    out = np.zeros_like(x)
    for y in range(size):
        for x0 in range(size):
            for i in range(filter_size):
                for j in range(filter_size):
                    yy, xx = y + i - centre, x0 + j - centre
                    if 0 <= yy < size and 0 <= xx < size:
                        out[..., y, x0] += taps[i] * taps[j] * x[..., yy, xx]
    return out


BLUR = """\
[blur]
type=blur
inputs=in
channels=2
filterSize={fs}
stdev={sd}
"""


@pytest.mark.parametrize("fs,sd", [(3, 1.0), (5, 0.7), (7, 2.0)])
def test_blur_forward_matches_reference(make_layer, fs, sd):
    layer = make_layer(BLUR.format(fs=fs, sd=sd), [FakeInput(outputs=2 * 7 * 7)])
    x = images(2, 2, 7)
    assert_close(layer(x.float()), blur_reference(x, fs, sd))
    assert_close(layer(x.float().flatten(1)), blur_reference(x, fs, sd))


def test_blur_geometry_gradient_and_startup_line(make_layer):
    layer = make_layer(BLUR.format(fs=5, sd=1.5), [FakeInput(channels=2, size=5)])
    assert (layer.channels, layer.img_size, layer.outputs) == (2, 5, 50)
    assert layer.init_line() == ("Initialized Gaussian blur layer 'blur', producing 5x5 "
                                 "2-channel output")
    gradcheck(layer, images(1, 2, 5))


@pytest.mark.parametrize("fs,sd,key,words", [
    (4, 1.0, "filterSize", ("filterSize=4", "3, 5, 7, 9")),
    (11, 1.0, "filterSize", ("filterSize=11",)),
    (7, 1.0, "filterSize", ("larger than the 6x6",)),
    (3, 0, "stdev", ("stdev=0", "positive")),
])
def test_blur_parse_errors(make_layer, fs, sd, key, words):
    expect_error(make_layer, BLUR.format(fs=fs, sd=sd), [FakeInput(outputs=2 * 6 * 6)], key,
                 *words)


def test_image_layers_reject_non_square_inputs(make_layer):
    expect_error(make_layer, BLUR.format(fs=3, sd=1), [FakeInput(outputs=2 * 30)], "channels",
                 "not channels=2 times a square image")


# -- nailbed ---------------------------------------------------------------------------------
NAILBED = "[nails]\ntype=nailbed\ninputs=in\nchannels=3\nstride={stride}\n"


@pytest.mark.parametrize("size,stride,out,start", [(7, 3, 3, 0), (8, 3, 3, 1), (9, 2, 5, 0),
                                                   (6, 4, 2, 1), (5, 1, 5, 0)])
def test_nailbed_picks_a_centred_grid(make_layer, size, stride, out, start):
    layer = make_layer(NAILBED.format(stride=stride), [FakeInput(outputs=3 * size * size)])
    assert (layer.img_size, layer.start, layer.outputs) == (out, start, 3 * out * out)
    x = images(2, 3, size)
    expected = np.zeros((2, 3, out, out))
    for i in range(out):
        for j in range(out):
            expected[:, :, i, j] = x[:, :, start + i * stride, start + j * stride].numpy()
    assert_close(layer(x.flatten(1)), expected, tol=0)
    gradcheck(layer, x)


def test_nailbed_startup_line_and_errors(make_layer):
    layer = make_layer(NAILBED.format(stride=2), [FakeInput(channels=3, size=8)])
    assert layer.init_line() == ("Initialized bed-of-nails layer 'nails' on GPUs 0, producing "
                                 "4x4 3-channel output")
    expect_error(make_layer, NAILBED.format(stride=0), [FakeInput(channels=3, size=8)], "stride",
                 "stride=0")


# -- href ------------------------------------------------------------------------------------
HREF = "[flip]\ntype=href\ninputs=in\nchannels={c}\n"


def test_href_mirrors_columns(make_layer):
    layer = make_layer(HREF.format(c=3), [FakeInput(outputs=3 * 5 * 5)])
    x = images(2, 3, 5)
    expected = x.numpy().copy()
    for col in range(5):
        expected[..., col] = x[..., 4 - col].numpy()
    assert_close(layer(x.flatten(1)), expected, tol=0)
    assert layer.init_line() == ("Initialized horizontal reflection layer 'flip', producing 5x5 "
                                 "3-channel output")
    gradcheck(layer, x)


def test_href_takes_one_to_three_channels(make_layer):
    expect_error(make_layer, HREF.format(c=4), [FakeInput(outputs=4 * 25)], "channels",
                 "channels=4", "between 1 and 3")


# -- resize and rscale -----------------------------------------------------------------------
def resize_reference(x, tgt, scale):
    """kResizeBilinear, pixel by pixel: source = p*scale + S/2 - tgt/2*scale, clamped to
    [0, S - 1.01], then the 4-tap blend u = floor(src + 1) - src (left), w = frac (bottom)."""
    x = x.numpy()
    size = x.shape[-1]
    centre = size * 0.5 - tgt * 0.5 * scale

    def source(p):
        return max(0.0, min(size - 1.01, p * scale + centre))

    out = np.zeros(x.shape[:2] + (tgt, tgt))
    for py in range(tgt):
        for px in range(tgt):
            sx, sy = source(px), source(py)
            u, w = math.floor(sx + 1) - sx, sy - math.floor(sy)
            x0, y0 = math.floor(sx), math.floor(sy)
            top = u * x[..., y0, x0] + (1 - u) * x[..., y0, x0 + 1]
            bottom = u * x[..., y0 + 1, x0] + (1 - u) * x[..., y0 + 1, x0 + 1]
            out[..., py, px] = (1 - w) * top + w * bottom
    return out


RESIZE = "[small]\ntype=resize\ninputs=in\nchannels=2\nscale={scale}\n"


@pytest.mark.parametrize("size,scale,tgt", [(7, 1.5, 4), (8, 2.0, 4), (5, 0.75, 6),
                                            (4, 0.5, 8), (6, 1.0, 6)])
def test_resize_matches_the_original_kernel(make_layer, size, scale, tgt):
    layer = make_layer(RESIZE.format(scale=scale), [FakeInput(outputs=2 * size * size)])
    assert (layer.img_size, layer.outputs) == (tgt, 2 * tgt * tgt)
    x = images(3, 2, size)
    assert_close(layer(x.float().flatten(1)), resize_reference(x, tgt, scale))
    gradcheck(layer, x)


def test_resize_startup_line_and_errors(make_layer):
    layer = make_layer(RESIZE.format(scale=1.5), [FakeInput(channels=2, size=9)])
    assert layer.init_line() == "Initialized resize layer 'small', producing 6x6 2-channel output"
    for bad in (0.4, 2.5):
        expect_error(make_layer, RESIZE.format(scale=bad), [FakeInput(channels=2, size=9)],
                     "scale", f"scale={bad}", "between 0.5 and 2")


RSCALE = "[rs]\ntype=rscale\ninputs=in\nchannels=2\nmaxScale={ms}\ntgtSize={tgt}\n"


def test_rscale_at_test_time_resizes_the_whole_image_by_max_scale(make_layer):
    layer = make_layer(RSCALE.format(ms=1.5, tgt=5), [FakeInput(outputs=2 * 8 * 8)]).eval()
    assert (layer.img_size, layer.outputs) == (5, 50)
    x = images(2, 2, 8)
    assert_close(layer(x.float()), resize_reference(x, 5, 1.5))
    assert layer.init_line() == ("Initialized random scale layer 'rs', producing 5x5 "
                                 "2-channel output")


def test_rscale_in_training_crops_a_randomly_rescaled_image(make_layer):
    layer = make_layer(RSCALE.format(ms=2.0, tgt=4), [FakeInput(outputs=2 * 8 * 8)]).train()
    x = images(2, 2, 8)
    seen = set()
    for seed in range(25):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        size, factor, start_y, start_x = layer.sample_view()
        seen.add(size)
        assert 4 <= size <= 8 and 0 <= start_y <= size - 4 and 0 <= start_x <= size - 4
        if size == 8:
            scaled = x.numpy()
        else:
            assert max(1.0, 8 / (size + 1)) <= factor <= 8 / size
            scaled = resize_reference(x, size, factor)
        assert_close(out, scaled[:, :, start_y:start_y + 4, start_x:start_x + 4], tol=1e-12)
    assert len(seen) >= 3
    layer.sample_view = lambda: (6, 1.25, 1, 2)        # one fixed draw for the whole gradcheck
    gradcheck(layer, x)


def test_rscale_draws_sizes_in_proportion_to_their_crops(make_layer):
    layer = make_layer(RSCALE.format(ms=1.5, tgt=4), [FakeInput(outputs=2 * 6 * 6)]).train()
    torch.manual_seed(0)
    sizes = [layer.sample_view()[0] for _ in range(3000)]
    freq = np.bincount(sizes, minlength=7)[4:] / len(sizes)
    np.testing.assert_allclose(freq, np.array([1, 4, 9]) / 14, atol=0.03)


@pytest.mark.parametrize("ms,tgt,key,words", [
    (2.5, 4, "maxScale", ("maxScale=2.5", "between 1.0 and 2.0")),
    (0.9, 4, "maxScale", ("maxScale=0.9",)),
    (1.5, 4, "tgtSize", ("tgtSize=4", "between 5 and 8")),
    (1.5, 9, "tgtSize", ("tgtSize=9",)),
])
def test_rscale_parse_errors(make_layer, ms, tgt, key, words):
    expect_error(make_layer, RSCALE.format(ms=ms, tgt=tgt), [FakeInput(channels=2, size=8)], key,
                 *words)


# -- crop ------------------------------------------------------------------------------------
CROP = "[cut]\ntype=crop\ninputs=in\nchannels=2\n{keys}\n"


@pytest.mark.parametrize("keys,start_y,start_x,size", [
    ("startX=1\nsizeX=3", 1, 1, 3),
    ("startX=2\nstartY=0\nsizeX=4", 0, 2, 4),
    ("startX=0\nsizeX=6", 0, 0, 6),
])
def test_crop_cuts_a_fixed_window(make_layer, keys, start_y, start_x, size):
    layer = make_layer(CROP.format(keys=keys), [FakeInput(outputs=2 * 6 * 6)])
    assert (layer.img_size, layer.outputs) == (size, 2 * size * size)
    x = images(2, 2, 6)
    expected = np.zeros((2, 2, size, size))
    for i in range(size):
        for j in range(size):
            expected[:, :, i, j] = x[:, :, start_y + i, start_x + j].numpy()
    assert_close(layer(x.flatten(1)), expected, tol=0)
    gradcheck(layer, x)
    assert layer.init_line() == (f"Initialized cropping layer 'cut', producing {size}x{size} "
                                 f"2-channel output")


@pytest.mark.parametrize("keys,key,words", [
    ("startX=3\nsizeX=4", "startX", ("startX (3) + sizeX (4) > image size (6)",)),
    ("startX=0\nstartY=4\nsizeX=3", "startY", ("startY (4) + sizeX (3) > image size (6)",)),
    ("startX=6\nsizeX=1", "startX", ("startX=6", "between 0 and 5")),
    ("startX=-1\nsizeX=1", "startX", ("startX=-1",)),
    ("startX=0\nsizeX=0", "sizeX", ("sizeX=0", "between 1 and 6")),
])
def test_crop_parse_errors(make_layer, keys, key, words):
    expect_error(make_layer, CROP.format(keys=keys), [FakeInput(channels=2, size=6)], key, *words)


# -- colour transforms -----------------------------------------------------------------------
YUV = np.array([[0.2126, 0.7152, 0.0722], [-0.09991, -0.33609, 0.436], [0.615, -0.55861, -0.05639]])
XYZ = np.array([[0.49, 0.31, 0.2], [0.17697, 0.8124, 0.01063], [0.0, 0.01, 0.99]])


def lab_reference(x, center):
    rgb = np.moveaxis(x.numpy(), 1, -1)
    X, Y, Z = np.moveaxis(rgb @ XYZ.T, -1, 0)

    def f(t):
        return np.where(t > 0.0088564517, np.maximum(t, 0.0088564517) ** 0.3333,
                        7.787037 * t + 0.13793103)

    lab = [116 * f(Y) - 16 - (50 if center else 0), 500 * (f(X) - f(Y)), 200 * (f(Y) - f(Z))]
    return np.stack(lab, axis=1)


def test_rgb2yuv_applies_the_matrix_per_pixel(make_layer):
    layer = make_layer("[yuv]\ntype=rgb2yuv\ninputs=in\n", [FakeInput(outputs=3 * 4 * 4)])
    assert (layer.channels, layer.img_size) == (3, 4)
    assert layer.init_line() == ("Initialized RGB --> YUV layer 'yuv', producing 4x4 "
                                 "3-channel output")
    x = images(2, 3, 4, 0, 1)
    expected = np.einsum("oc,ncyx->noyx", YUV, x.numpy())
    assert_close(layer(x.float().flatten(1)), expected)
    gradcheck(layer, x)


@pytest.mark.parametrize("center", [False, True])
def test_rgb2lab_matches_reference(make_layer, center):
    text = f"[lab]\ntype=rgb2lab\ninputs=in\ncenter={int(center)}\n"
    layer = make_layer(text, [FakeInput(channels=3, size=4)])
    x = images(2, 3, 4, 0, 1)
    x[0, :, 0, :] = 0.002                              # the linear branch, below the threshold
    assert_close(layer(x.float()), lab_reference(x, center), tol=1e-4)
    for value, lab in ((1.0, [100.0, 0.0, 0.0]), (0.0, [0.0, 0.0, 0.0])):   # white, black
        lab[0] -= 50.0 if center else 0.0
        out = layer(torch.full((1, 3, 4, 4), value, dtype=torch.float64))
        assert_close(out, np.broadcast_to(np.array(lab)[None, :, None, None], out.shape), tol=1e-5)


@pytest.mark.parametrize("low,high", [(0.2, 1.0), (0.0, 0.005)])
def test_rgb2lab_gradient_on_both_branches(make_layer, low, high):
    layer = make_layer("[lab]\ntype=rgb2lab\ninputs=in\n", [FakeInput(channels=3, size=3)])
    gradcheck(layer, images(2, 3, 3, low, high))


@pytest.mark.parametrize("type_name", ["rgb2yuv", "rgb2lab"])
def test_colour_layers_take_three_channels(make_layer, type_name):
    text = f"[col]\ntype={type_name}\ninputs=in\nchannels=4\n"
    expect_error(make_layer, text, [FakeInput(outputs=4 * 9)], "channels", "got 4 channels")
    expect_error(make_layer, f"[col]\ntype={type_name}\ninputs=in\n", [FakeInput(outputs=40)],
                 "inputs", "40 outputs", "not 3 channels times a square image")


def test_colour_layer_rejects_a_four_channel_image_input(make_layer):
    with pytest.raises(ConfigError, match="got 4 channels"):
        make_layer("[col]\ntype=rgb2yuv\ninputs=in\n", [FakeInput(channels=4, size=3)])


# -- sum -------------------------------------------------------------------------------------
def test_sum_is_refused_at_parse_time(make_layer):
    expect_error(make_layer, "[s]\ntype=sum\ninputs=in\nstride=2\n", [FakeInput(outputs=8)],
                 "type", "layer type 'sum' is not supported (cuda-convnet2 never implemented it)")
