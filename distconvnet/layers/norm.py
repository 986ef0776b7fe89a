"""Normalisation: `cmrnorm` (across maps), `rnorm` (same map) and `cnorm` (contrast), spec §6.1.

All three compute out = in · (minDiv + scale · Σ_W q / |W|)^(−pow), where q is in² for the response
norms and (in − m)² for cnorm, m being each pixel's own size×size mean. |W| is the nominal window
size — size for cmrnorm, size² for rnorm and cnorm — even where the window is clipped at a border:
the original divides `scale` by it once, when it reads the layer-params file. Our averages with
zero padding counted give exactly Σ_W q / |W|.
"""

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Layer, register


class NormLayer(Layer):
    """Shared by the three: the window `size`, the params-file keys, and the formula."""

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
        if sec is None:
            raise ConfigError(f"layer of type '{self.type_name}' requires extra parameters "
                              f"(scale, pow), but none were given in the layer-params file",
                              layer=self.name)
        self.scale = self.check_range(sec, "scale", sec.float("scale"), 0.0, None, ">= 0")
        self.pow = self.check_range(sec, "pow", sec.float("pow"), 0.0, None, ">= 0")
        self.min_div = sec.float("minDiv", 1.0)
        if not self.min_div > 0:
            raise sec.error(f"minDiv={self.min_div:g}: expected a positive number (it keeps the "
                            f"denominator of an all-zero window away from 0)", "minDiv")

    def forward(self, x):
        x = self.as_image(x, self.channels, self.img_size)
        return x * (self.min_div + self.scale * self.window_mean(x)).pow(-self.pow)

    def window_mean(self, x):
        """Σ_W q / |W| at every output position."""
        raise NotImplementedError

    def spatial_mean(self, q, in_image_only=False):
        """Mean of q over the size×size window whose corner is at (y, x) − ⌊size/2⌋, clipped;
        the divisor is size² or, with in_image_only, the count of in-image pixels."""
        y = F.avg_pool2d(q, self.size, 1, self.size // 2, count_include_pad=not in_image_only)
        s = self.img_size
        return y if y.shape[-1] == s else y[:, :, :s, :s]   # an even size makes one extra


@register("cmrnorm")
class CrossMapResponseNormLayer(NormLayer):
    description = "cross-map response-normalization layer"
    min_size = 2

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        self.blocked = sec.bool("blocked", False)

    def size_limit(self):
        return self.channels, f"channels={self.channels}"

    def window_mean(self, x):
        squares = x * x
        if self.blocked:
            return self._block_mean(squares)
        half, c = self.size // 2, self.channels
        # Channels f − ⌊size/2⌋ … f − ⌊size/2⌋ + size − 1, as torch's local_response_norm; zero
        # padding counted in the mean gives the division by size.
        n, _, h, w = squares.shape
        if squares.is_contiguous(memory_format=torch.channels_last):
            rows = squares.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)   # a view here
            mean = F.avg_pool1d(rows, self.size, 1, half)[:, :, :c]
            return mean.reshape(n, h, w, c).permute(0, 3, 1, 2)
        planes = squares.reshape(n, 1, c, h * w)                          # a view here
        mean = F.avg_pool2d(planes, (self.size, 1), 1, (half, 0))[:, 0, :c]
        return mean.reshape(n, c, h, w)

    def _block_mean(self, squares):
        """blocked=1: the aligned block of `size` maps holding f; the last may be short."""
        n, c, h, w = squares.shape
        blocks = -(-c // self.size)
        if blocks * self.size != c:
            squares = F.pad(squares, (0, 0, 0, 0, 0, blocks * self.size - c))
        block_mean = squares.reshape(n, blocks, self.size, h, w).mean(2)
        return block_mean.repeat_interleave(self.size, dim=1)[:, :c]


@register("rnorm")
class ResponseNormLayer(NormLayer):
    description = "response-normalization layer"

    def window_mean(self, x):
        return self.spatial_mean(x * x)


@register("cnorm")
class ContrastNormLayer(NormLayer):
    description = "contrast-normalization layer"

    def window_mean(self, x):
        # Each pixel's own local mean, over in-image pixels only (the original's AvgPooler),
        # then the size×size sum of the squared differences around the output pixel.
        diffs = x - self.spatial_mean(x, in_image_only=True)
        return self.spatial_mean(diffs * diffs)
