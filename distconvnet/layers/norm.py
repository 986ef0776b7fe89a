"""Normalisation: `cmrnorm` (across maps), `rnorm` (same map) and `cnorm` (contrast), spec §6.1.

All three compute out = in · (minDiv + scale · Σ_W q / |W|)^(−pow), where q is in² for the response
norms and (in − m)² for cnorm, m being each pixel's own size×size mean. |W| is the nominal window
size — size for cmrnorm, size² for rnorm and cnorm — even where the window is clipped at a border:
the original divides `scale` by it once, when it reads the layer-params file. Sums over zero
padding give exactly that.

Speed: the response norms are the heaviest elementwise work of the ImageNet and CIFAR nets. Their
window sums are the squares plus `size` − 1 shifted slices of them added in place (zeros
outside; no padding copy, no pooling kernel), and their gradient is written out by hand
(_ResponseNorm), which saves autograd the several full-size temporaries of differentiating the
formula op by op: in eager mode the layer's forward and backward run 3-6x faster on the CPU than
through avg_pool or torch's local_response_norm. Under torch.compile the opposite holds: the
plain formula over average pools (_window_mean) lets inductor derive the backward and fuse it
with its neighbours, where the hand-written function's saved tensors must be materialised.
Measured on one H100 (imagenet-1gpu step, bf16, batch 512, BENCHMARKS.md): 46.8k img/s with
the formula, 33.9k with the hand-written function.
"""

import torch
import torch.nn.functional as F

from .base import Layer, register

CROSS_MAP, BLOCKED, SPATIAL = "cross-map", "blocked", "spatial"


def _shifted_sum(q, dim, size, before):
    """Σ_{k<size} q[i − before + k] along `dim` at every i, with zeros outside q: a copy of q
    plus size − 1 shifted slices, each added in place over the part where it lies inside."""
    total = q.clone()
    length = q.shape[dim]
    for offset in range(-before, size - before):
        if offset and abs(offset) < length:
            start = max(-offset, 0)
            span = length - abs(offset)
            total.narrow(dim, start, span).add_(q.narrow(dim, start + offset, span))
    return total


def _window_sum(q, window, size, transposed):
    """Σ_W q for every output position; `transposed` sums, for each input position, over the
    windows that hold it (what the gradient needs). A window spans positions
    i − ⌊size/2⌋ … i − ⌊size/2⌋ + size − 1, so its transpose starts size − 1 − ⌊size/2⌋ before
    i; blocked windows are their own transpose."""
    if window == BLOCKED:
        n, c, h, w = q.shape
        blocks = -(-c // size)
        if blocks * size != c:
            q = F.pad(q, (0, 0, 0, 0, 0, blocks * size - c))
        block_sums = q.reshape(n, blocks, size, h, w).sum(2, keepdim=True)
        return block_sums.expand(n, blocks, size, h, w).reshape(n, blocks * size, h, w)[:, :c]
    before = size - 1 - size // 2 if transposed else size // 2
    if window == CROSS_MAP:
        return _shifted_sum(q, 1, size, before)
    return _shifted_sum(_shifted_sum(q, 2, size, before), 3, size, before)


def _spatial_mean(q, size, in_image_only=False):
    """Mean of q over the size×size window whose corner is at (y, x) − ⌊size/2⌋, clipped; the
    divisor is size² or, with in_image_only, the count of in-image pixels."""
    mean = F.avg_pool2d(q, size, 1, size // 2, count_include_pad=not in_image_only)
    h, w = q.shape[-2:]
    return mean if mean.shape[-1] == w else mean[:, :, :h, :w]   # an even size makes one extra


def _window_mean(q, window, size):
    """Σ_W q / |W| through average pools with zero padding counted: the formula for inductor."""
    if window == SPATIAL:
        return _spatial_mean(q, size)
    n, c, h, w = q.shape
    if window == BLOCKED:
        return _window_sum(q, BLOCKED, size, False) / size
    half = size // 2
    if q.is_contiguous(memory_format=torch.channels_last):
        rows = q.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)          # a view here
        mean = F.avg_pool1d(rows, size, 1, half)[:, :, :c]
        return mean.reshape(n, h, w, c).permute(0, 3, 1, 2)
    planes = q.reshape(n, 1, c, h * w)                                  # a view here
    return F.avg_pool2d(planes, (size, 1), 1, (half, 0))[:, 0, :c].reshape(n, c, h, w)


class _ResponseNorm(torch.autograd.Function):
    """out_f = x_f · D_f^(−pow) with D_f = minDiv + a·Σ_{j∈W(f)} x_j², a = scale/|W|, and

        ∂E/∂x_j = g_j · D_j^(−pow) − 2·a·pow · x_j · Σ_{f: j∈W(f)} g_f · x_f · D_f^(−pow−1)."""

    @staticmethod
    def forward(ctx, x, window, size, scale_per_term, power, min_div):
        denominator = _window_sum(x * x, window, size, False).mul(scale_per_term).add_(min_div)
        factor = denominator.pow(-power)
        ctx.save_for_backward(x, denominator, factor)
        ctx.geometry = (window, size, scale_per_term, power)
        return x * factor

    @staticmethod
    def backward(ctx, grad):
        x, denominator, factor = ctx.saved_tensors
        window, size, scale_per_term, power = ctx.geometry
        scaled = grad * factor
        spread = _window_sum(torch.mul(scaled, x).div_(denominator), window, size, True)
        grad_x = scaled.addcmul_(x, spread, value=-2 * scale_per_term * power)
        return grad_x, None, None, None, None, None


class NormLayer(Layer):
    """Shared by the three: the window `size` and the params-file keys."""

    needs_params = True
    min_size = 1    # cmrnorm: 2

    def parse(self, sec, inputs, ctx):
        self.channels, self.img_size = self.image_geometry(sec, inputs[0])
        limit, limit_name = self.size_limit()
        self.size = self.check_range(sec, "size", sec.int("size"), self.min_size, limit,
                                     f"between {self.min_size} and {limit_name}")
        self.scale, self.pow, self.min_div = None, None, 1.0

    def size_limit(self):
        return self.img_size, f"the input size {self.img_size}"

    def set_params(self, sec):
        self.scale = self.check_range(sec, "scale", sec.float("scale"), 0.0, None, ">= 0")
        self.pow = self.check_range(sec, "pow", sec.float("pow"), 0.0, None, ">= 0")
        self.min_div = sec.float("minDiv", 1.0)
        if not self.min_div > 0:
            raise sec.error(f"minDiv={self.min_div:g}: expected a positive number (it keeps the "
                            f"denominator of an all-zero window away from 0)", "minDiv")


class ResponseNormBase(NormLayer):
    """cmrnorm and rnorm: q = x², through _ResponseNorm."""

    window = None       # CROSS_MAP, BLOCKED or SPATIAL
    window_terms = 1    # |W|

    def forward(self, x):
        x = self.as_image(x, self.channels, self.img_size)
        if torch.compiler.is_compiling():
            mean = _window_mean(x * x, self.window, self.size)
            return x * (self.min_div + self.scale * mean).pow(-self.pow)
        return _ResponseNorm.apply(x, self.window, self.size, self.scale / self.window_terms,
                                   self.pow, self.min_div)


@register("cmrnorm")
class CrossMapResponseNormLayer(ResponseNormBase):
    description = "cross-map response-normalization layer"
    min_size = 2

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        # Channels f − ⌊size/2⌋ … f − ⌊size/2⌋ + size − 1, as torch's local_response_norm;
        # blocked=1: the aligned block of `size` maps holding f (the last may be short).
        self.blocked = sec.bool("blocked", False)
        self.window = BLOCKED if self.blocked else CROSS_MAP
        self.window_terms = self.size

    def size_limit(self):
        return self.channels, f"channels={self.channels}"


@register("rnorm")
class ResponseNormLayer(ResponseNormBase):
    description = "response-normalization layer"
    window = SPATIAL

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        self.window_terms = self.size * self.size


@register("cnorm")
class ContrastNormLayer(NormLayer):
    description = "contrast-normalization layer"

    def forward(self, x):
        x = self.as_image(x, self.channels, self.img_size)
        # Each pixel's own local mean, over in-image pixels only (the original's AvgPooler),
        # then the size×size sum of the squared differences around the output pixel.
        diffs = x - _spatial_mean(x, self.size, in_image_only=True)
        return x * (self.min_div + self.scale * _spatial_mean(diffs * diffs, self.size)
                    ).pow(-self.pow)
