"""Image-processing layers (spec §4.3): blur, nailbed, href, resize, rscale, crop, rgb2yuv,
rgb2lab, and the `sum` type, which cuda-convnet2 parsed but never implemented.

Each numeric rule below was taken from the original's parser (layer.py) and kernels
(cudaconv3/src/conv_util.cu, cudaconvnet/src/layer.cu), and is cited where it is used.

One deliberate difference: the original refuses resize, rscale, crop, rgb2yuv and rgb2lab
above any layer with weights, because its engine cannot backpropagate through them. Every
layer here is built from differentiable torch ops, so gradients flow through all of them and
that restriction is lifted rather than checked.
"""

import math

import torch
import torch.nn.functional as F

from .base import Layer, register


class _ImageOpLayer(Layer):
    """One image in, one image out."""

    num_inputs = 1
    # The original's startup line for most of these layers names no GPUs
    # ("Initialized Gaussian blur layer 'b', producing 8x8 3-channel output").
    names_gpus = False

    def init_line(self):
        if self.names_gpus:
            return super().init_line()
        return f"Initialized {self.description} '{self.name}', producing {self.output_words()}"


def _check_positive(sec, key, value):
    if not value > 0:
        raise sec.error(f"{key}={value:g}: expected a positive number", key)
    return value


def gaussian_taps(filter_size, stdev):
    """The 1-D blur kernel as layer.py builds it: exp(−(fs//2 − i)²/(2σ²)) in float32, summing
    to 1. `fs//2` is Python 2 integer division, so the kernel is centred on tap fs//2."""
    centre = filter_size // 2
    taps = torch.tensor([math.exp(-((centre - i) ** 2) / (2.0 * stdev ** 2))
                         for i in range(filter_size)], dtype=torch.float64).float()
    return taps / taps.sum()


@register("blur")
class GaussianBlurLayer(_ImageOpLayer):
    description = "Gaussian blur layer"

    def parse(self, sec, inputs, ctx):
        self.channels, self.img_size = self.image_geometry(sec, inputs[0])
        self.filter_size = sec.int("filterSize")
        if self.filter_size not in (3, 5, 7, 9):
            raise sec.error(f"filterSize={self.filter_size}: expected one of 3, 5, 7, 9",
                            "filterSize")
        if self.filter_size > self.img_size:
            raise sec.error(f"filterSize={self.filter_size} is larger than the "
                            f"{self.img_size}x{self.img_size} input image", "filterSize")
        self.stdev = _check_positive(sec, "stdev", sec.float("stdev"))
        self.register_buffer("taps", gaussian_taps(self.filter_size, self.stdev),
                             persistent=False)

    def forward(self, x):
        img = self.as_image(x, self.channels, self.img_size)
        n, c, s = img.shape[0], self.channels, self.img_size
        planes = img.reshape(n * c, 1, s, s)
        taps = self.taps.to(img.dtype)
        # kGaussianBlur runs rows then columns and treats pixels outside the image as zero,
        # with no renormalisation at the borders: a zero-padded "same" convolution.
        radius = self.filter_size // 2
        planes = F.conv2d(planes, taps.view(1, 1, 1, -1), padding=(0, radius))
        planes = F.conv2d(planes, taps.view(1, 1, -1, 1), padding=(radius, 0))
        return planes.view(n, c, s, s)


@register("nailbed")
class NailbedLayer(_ImageOpLayer):
    description = "bed-of-nails layer"
    names_gpus = True

    def parse(self, sec, inputs, ctx):
        self.channels, size = self.image_geometry(sec, inputs[0])
        # The original checks nothing here (stride=0 crashes its parser, its kernel asserts
        # stride > 1); stride=1 is accepted as the identity.
        self.stride = self.check_range(sec, "stride", sec.int("stride"), 1)
        self.img_size = -(-size // self.stride)
        # Centre the grid: what is left over after the span is split in two, rounded down.
        self.start = (size - self.stride * (self.img_size - 1)) // 2
        self.in_size = size

    def forward(self, x):
        img = self.as_image(x, self.channels, self.in_size)
        end = self.start + self.stride * (self.img_size - 1) + 1
        return img[:, :, self.start:end:self.stride, self.start:end:self.stride]


@register("href")
class HorizontalReflectionLayer(_ImageOpLayer):
    description = "horizontal reflection layer"

    def parse(self, sec, inputs, ctx):
        self.channels, self.img_size = self.image_geometry(sec, inputs[0])
        # The original's kernel (kReflectH) is instantiated for 1 to 3 colours only.
        self.check_range(sec, "channels", self.channels, 1, 3)

    def forward(self, x):
        return torch.flip(self.as_image(x, self.channels, self.img_size), dims=(3,))


def bilinear_matrix(in_size, out_size, scale, device=None):
    """(out_size, in_size) float64 weights of convResizeBilinear along one axis (conv_util.cu).

    Output pixel p samples the input at p·scale + (S − T·scale)/2, which centres the sampled
    span; the position is clamped to [0, S − 1.01], so the last column blends 1% of its left
    neighbour. Bilinear interpolation is this 1-D interpolation applied to rows and columns.
    """
    p = torch.arange(out_size, dtype=torch.float64, device=device)
    src = p * scale + (in_size * 0.5 - out_size * 0.5 * scale)
    src = src.clamp(max=in_size - 1.01).clamp(min=0.0)
    left = src.floor().long()
    frac = (src - left).unsqueeze(1)
    right = (left + 1).clamp(max=in_size - 1)
    return (1 - frac) * F.one_hot(left, in_size) + frac * F.one_hot(right, in_size)


def bilinear_resize(img, weights):
    """(N, C, S, S) -> (N, C, T, T) with a `bilinear_matrix`, over rows then columns."""
    weights = weights.to(img.dtype)
    return weights @ img @ weights.T


@register("resize")
class ResizeLayer(_ImageOpLayer):
    description = "resize layer"

    def parse(self, sec, inputs, ctx):
        self.channels, self.in_size = self.image_geometry(sec, inputs[0])
        self.scale = self.check_range(sec, "scale", sec.float("scale"), 0.5, 2.0)
        self.img_size = math.floor(self.in_size / self.scale)
        if self.img_size < 1:
            raise sec.error(f"scale={self.scale:g} shrinks the {self.in_size}x{self.in_size} "
                            f"input to nothing", "scale")
        self.register_buffer("weights", bilinear_matrix(self.in_size, self.img_size, self.scale),
                             persistent=False)

    def forward(self, x):
        return bilinear_resize(self.as_image(x, self.channels, self.in_size), self.weights)


@register("rscale")
class RandomScaleLayer(_ImageOpLayer):
    """Training: rescale the minibatch to a random size R in [tgtSize, S] and cut a random
    tgtSize crop, one draw per minibatch (RandomScaleLayer::fpropActs). R is drawn with
    probability ∝ (R − tgtSize + 1)², the number of crops it offers, so every (size, crop)
    pair is equally likely; the resize factor is uniform in [max(1, S/(R+1)), S/R].
    Test: the whole image resized to tgtSize with factor maxScale.

    Deliberate difference: the original draws R − tgtSize from [0, S − floor(S/maxScale)],
    which overshoots S (upsampling, misweighted) whenever tgtSize > floor(S/maxScale); here R
    never exceeds S. Its multiview-test branch (a plain copy, valid only when tgtSize = S) has
    no counterpart: a layer does not know the pass type, so multiview uses the test rule.
    """

    description = "random scale layer"

    def parse(self, sec, inputs, ctx):
        self.channels, self.in_size = self.image_geometry(sec, inputs[0])
        self.max_scale = self.check_range(sec, "maxScale", sec.float("maxScale"), 1.0, 2.0)
        min_size = max(1, math.floor(self.in_size / self.max_scale))
        self.img_size = self.check_range(sec, "tgtSize", sec.int("tgtSize"), min_size,
                                         self.in_size)
        self.register_buffer("test_weights", bilinear_matrix(self.in_size, self.img_size,
                                                             self.max_scale), persistent=False)

    def sample_view(self):
        """One training draw from torch's CPU generator: (rescaled size R, resize factor,
        crop start y, crop start x). Drawing on the CPU keeps the GPU stream unsynchronised."""
        size, tgt = self.in_size, self.img_size
        crops_per_size = torch.arange(1, size - tgt + 2, dtype=torch.float64) ** 2
        rescaled = tgt + int(torch.multinomial(crops_per_size, 1).item())
        factor = 1.0
        if rescaled != size:
            low, high = max(1.0, size / (rescaled + 1.0)), size / rescaled
            factor = low + torch.rand((), dtype=torch.float64).item() * (high - low)
        start_y, start_x = torch.randint(rescaled - tgt + 1, (2,)).tolist()
        return rescaled, factor, start_y, start_x

    def forward(self, x):
        img = self.as_image(x, self.channels, self.in_size)
        if not self.training:
            return bilinear_resize(img, self.test_weights)
        rescaled, factor, start_y, start_x = self.sample_view()
        # At full size the original crops directly: resizing by 1 would still blend the
        # last column through the S - 1.01 clamp.
        if rescaled != self.in_size:
            img = bilinear_resize(img, bilinear_matrix(self.in_size, rescaled, factor,
                                                       img.device))
        tgt = self.img_size
        return img[:, :, start_y:start_y + tgt, start_x:start_x + tgt]


@register("crop")
class CropLayer(_ImageOpLayer):
    description = "cropping layer"

    def parse(self, sec, inputs, ctx):
        self.channels, size = self.image_geometry(sec, inputs[0])
        self.start_x = self.check_range(sec, "startX", sec.int("startX"), 0, size - 1)
        self.start_y = self.check_range(sec, "startY", sec.int("startY", self.start_x), 0,
                                        size - 1)
        self.img_size = self.check_range(sec, "sizeX", sec.int("sizeX"), 1, size)
        # The original's parser checks only startX + sizeX; its kernel asserts both.
        for key, start in (("startX", self.start_x), ("startY", self.start_y)):
            if start + self.img_size > size:
                raise sec.error(f"{key} ({start}) + sizeX ({self.img_size}) > image size "
                                f"({size})", key)
        self.in_size = size

    def forward(self, x):
        img = self.as_image(x, self.channels, self.in_size)
        y, x0, t = self.start_y, self.start_x, self.img_size
        return img[:, :, y:y + t, x0:x0 + t]


class _ColorTransformLayer(_ImageOpLayer):
    """A per-pixel map of 3-channel RGB images; `channels`, if given, must be 3."""

    def parse(self, sec, inputs, ctx):
        inp = inputs[0]
        channels = sec.int("channels", inp.channels if inp.channels is not None else 3)
        if channels != 3:
            raise sec.error(f"a {self.type_name} layer takes 3-channel (RGB) images, got "
                            f"{channels} channels", "channels")
        size = math.isqrt(inp.outputs // 3)
        if 3 * size * size != inp.outputs:
            raise sec.error(f"input '{inp.name}' has {inp.outputs} outputs per case, which is "
                            f"not 3 channels times a square image", "inputs")
        self.channels, self.img_size = 3, size

    def rgb_mix(self, x, matrix):
        img = self.as_image(x, 3, self.img_size)
        return torch.einsum("oc,ncyx->noyx", matrix.to(img.dtype), img)


# kRGBToYUV (conv_util.cu), rows Y, U, V; columns R, G, B.
_RGB_TO_YUV = [[0.2126, 0.7152, 0.0722],
               [-0.09991, -0.33609, 0.436],
               [0.615, -0.55861, -0.05639]]

# kRGBToLAB: its RGB -> XYZ matrix, already divided by the white point (so X, Y, Z ≤ 1 for
# inputs in [0, 1]), and its f(t) with the exponent 0.3333 it uses instead of 1/3.
_RGB_TO_XYZ = [[0.49, 0.31, 0.2],
               [0.17697, 0.8124, 0.01063],
               [0.0, 0.01, 0.99]]
_LAB_THRESHOLD = 0.0088564517
_LAB_EXPONENT = 0.3333
_LAB_SLOPE = 7.787037
_LAB_OFFSET = 0.13793103


@register("rgb2yuv")
class RGBToYUVLayer(_ColorTransformLayer):
    description = "RGB --> YUV layer"

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        self.register_buffer("matrix", torch.tensor(_RGB_TO_YUV, dtype=torch.float64),
                             persistent=False)

    def forward(self, x):
        return self.rgb_mix(x, self.matrix)


@register("rgb2lab")
class RGBToLABLayer(_ColorTransformLayer):
    """L*a*b* for inputs in [0, 1] (the original warns: no mean subtraction beforehand);
    `center` subtracts 50 from L*, moving its range from [0, 100] to [-50, 50]."""

    description = "RGB --> LAB layer"

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        self.center = sec.bool("center", False)
        self.register_buffer("matrix", torch.tensor(_RGB_TO_XYZ, dtype=torch.float64),
                             persistent=False)

    def forward(self, x):
        xyz = self.rgb_mix(x, self.matrix)
        # The clamp keeps pow away from negative numbers in the unused branch, whose NaN
        # gradient would otherwise leak through torch.where.
        cube_root = xyz.clamp(min=_LAB_THRESHOLD).pow(_LAB_EXPONENT)
        f = torch.where(xyz > _LAB_THRESHOLD, cube_root, _LAB_SLOPE * xyz + _LAB_OFFSET)
        fx, fy, fz = f.unbind(1)
        lightness = 116.0 * fy - 16.0 - (50.0 if self.center else 0.0)
        return torch.stack((lightness, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


@register("sum")
class SumLayer(Layer):
    """cuda-convnet2's layer.py parses `sum` but its engine has no such layer ("Unknown layer
    type sum"), so a net using it never ran there; we refuse it at parse time."""

    description = "sum layer"

    def __init__(self, sec, inputs, ctx):
        raise sec.error("layer type 'sum' is not supported (cuda-convnet2 never implemented "
                        "it)", "type")
