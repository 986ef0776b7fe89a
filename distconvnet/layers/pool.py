"""Pooling: `pool` (max / avg / sum / maxabs over square windows) and `cmpool` (max across maps).

Geometry is cuda-convnet2's (spec §6.2): output k along an axis pools the window that starts at
pixel start + k·stride and spans sizeX pixels, clipped to the image, and the automatic output
count is ceil((S − start − sizeX)/stride) + 1 ("ceil mode"). `start` may be negative.
"""

import torch
import torch.nn.functional as F

from .base import Layer, register

POOL_TYPES = ("max", "avg", "maxabs")


def auto_outputs_x(img_size, start, size_x, stride):
    """ceil((S − start − sizeX)/stride) + 1, in integers (spec §6.2)."""
    return -(-(img_size - start - size_x) // stride) + 1


def _torch_ceil_outputs(length, size, stride, padding):
    """How many windows torch's ceil-mode pooling makes (aten's pooling_output_shape)."""
    count = -(-(length + 2 * padding - size) // stride) + 1
    if (count - 1) * stride >= length + padding:
        count -= 1      # torch drops a last window that would start inside the right padding
    return count


@register("pool")
class PoolLayer(Layer):
    def parse(self, sec, inputs, ctx):
        self.pool = sec.str("pool")
        if self.pool not in POOL_TYPES:
            raise sec.error(f"pool={self.pool!r}: expected one of "
                            f"{', '.join(POOL_TYPES)}", "pool")
        self.description = f"{self.pool}-pooling layer"
        channels, size = self.image_geometry(sec, inputs[0])
        self.size_x = self.check_range(sec, "sizeX", sec.int("sizeX"), 1, size,
                                       f"between 1 and the input size {size}")
        self.stride = self.check_range(sec, "stride", sec.int("stride"), 1, self.size_x,
                                       f"between 1 and sizeX={self.size_x}")
        self.start = sec.int("start", 0)
        if not -self.size_x < self.start < size:
            raise sec.error(f"start={self.start}: expected between {1 - self.size_x} and "
                            f"{size - 1}, so that the first window overlaps the {size}x{size} "
                            f"image", "start")
        self.summing = self._parse_sum(sec)
        self.outputs_x = self._parse_outputs_x(sec, size)
        self.in_size, self.channels, self.img_size = size, channels, self.outputs_x
        self.native_padding = self._native_padding()
        self.register_buffer("window_pixels", self._window_pixels(), persistent=False)

    def _parse_sum(self, sec):
        summing = sec.bool("sum", False)
        if summing and self.pool != "avg":
            raise sec.error(f"sum=1 applies only to pool=avg, not pool={self.pool}", "sum")
        return summing

    def _parse_outputs_x(self, sec, size):
        outputs_x = self.check_range(sec, "outputsX", sec.int("outputsX", 0), 0, None,
                                     ">= 0 (0 = automatic)")
        most = (size - 1 - self.start) // self.stride + 1   # windows that start inside
        if outputs_x == 0:
            outputs_x = auto_outputs_x(size, self.start, self.size_x, self.stride)
            if outputs_x < 1:
                raise sec.error(f"start={self.start}, sizeX={self.size_x}, stride={self.stride} "
                                f"leave no output window on a {size}x{size} image", "start")
        elif outputs_x > most:
            last = self.start + (outputs_x - 1) * self.stride
            raise sec.error(f"outputsX={outputs_x}: window {outputs_x - 1} would start at pixel "
                            f"{last}, outside the {size}x{size} image (expected at most "
                            f"{most})", "outputsX")
        return outputs_x

    def _native_padding(self):
        """Symmetric padding with which torch's ceil-mode pooling makes our first outputsX
        windows (same starts, same clipping, in-image divisor), or None when it cannot."""
        padding = max(-self.start, 0)
        length = self.in_size - max(self.start, 0)     # a positive start is cropped away first
        if padding > self.size_x // 2:
            return None
        made = _torch_ceil_outputs(length, self.size_x, self.stride, padding)
        return padding if made >= self.outputs_x else None

    def _window_pixels(self):
        """In-image pixels of each clipped window: avg's divisor where we pad explicitly."""
        starts = self.start + self.stride * torch.arange(self.outputs_x)
        per_axis = (starts + self.size_x).clamp(max=self.in_size) - starts.clamp(min=0)
        return torch.outer(per_axis, per_axis).float()

    # -- running -----------------------------------------------------------------------------
    def forward(self, x):
        x = self.as_image(x, self.channels, self.in_size)
        if self.pool == "maxabs":
            high, low = self._max_pool(x), -self._max_pool(-x)
            return torch.where(high.abs() >= low.abs(), high, low)
        if self.pool == "max":
            return self._max_pool(x)
        return self._avg_pool(x)

    def _max_pool(self, x):
        # torch sends a window's gradient to one argmax; the original copies it to every input
        # equal to the max. Only ties differ, and after a ReLU those are zeros whose gradient
        # the ReLU stops anyway, so we keep torch's fast kernels.
        if self.native_padding is not None:
            y = F.max_pool2d(self._crop(x), self.size_x, self.stride, self.native_padding,
                             ceil_mode=True)
            return self._first_outputs(y)
        return F.max_pool2d(self._pad(x, float("-inf")), self.size_x, self.stride)

    def _avg_pool(self, x):
        divisor = 1 if self.summing else None
        if self.native_padding is not None:
            y = F.avg_pool2d(self._crop(x), self.size_x, self.stride, self.native_padding,
                             ceil_mode=True, count_include_pad=False, divisor_override=divisor)
            return self._first_outputs(y)
        sums = F.avg_pool2d(self._pad(x, 0.0), self.size_x, self.stride, divisor_override=1)
        return sums if self.summing else sums / self.window_pixels.to(sums.dtype)

    def _crop(self, x):
        return x[:, :, self.start:, self.start:] if self.start > 0 else x

    def _first_outputs(self, y):
        m = self.outputs_x
        return y if y.shape[-1] == m else y[:, :, :m, :m]

    def _pad(self, x, value):
        """Pad (or crop, where negative) so that plain floor-mode pooling makes our windows."""
        before = -self.start
        after = self.start + (self.outputs_x - 1) * self.stride + self.size_x - self.in_size
        return F.pad(x, (before, after, before, after), value=value)


@register("cmpool")
class CrossMapPoolLayer(Layer):
    """Max over groups of `size` maps; output map o pools maps start + o·stride onwards."""

    def parse(self, sec, inputs, ctx):
        pool = sec.str("pool", "max")
        if pool != "max":
            raise sec.error(f"pool={pool!r}: cross-map pooling supports only max", "pool")
        self.description = "cross-map max-pooling layer"
        channels, size = self.image_geometry(sec, inputs[0])
        self.size = self.check_range(sec, "size", sec.int("size"), 1, channels,
                                     f"between 1 and channels={channels}")
        self.stride = self.check_range(sec, "stride", sec.int("stride"), 1, self.size,
                                       f"between 1 and size={self.size}")
        self.start = self.check_range(sec, "start", sec.int("start", 0), 1 - self.size, 0,
                                      f"between {1 - self.size} and 0, so that the first "
                                      f"group holds at least one map")
        out_channels = self.check_range(sec, "outputs", sec.int("outputs"), 1, None,
                                        "a positive number of output channels")
        last_start = self.start + (out_channels - 1) * self.stride
        covered = last_start + self.size
        if covered < channels:
            raise sec.error(f"start={self.start}, stride={self.stride}, size={self.size}, "
                            f"outputs={out_channels} cover only {covered} of {channels} "
                            f"input channels", "outputs")
        if last_start >= channels:
            raise sec.error(f"outputs={out_channels}: group {out_channels - 1} would start at "
                            f"map {last_start}, past the {channels} input channels", "outputs")
        self.in_channels, self.pad_after = channels, covered - channels
        self.channels, self.img_size = out_channels, size

    def forward(self, x):
        x = self.as_image(x, self.in_channels, self.img_size)
        if self.start < 0 or self.pad_after > 0:
            x = F.pad(x, (0, 0, 0, 0, -self.start, self.pad_after), value=float("-inf"))
        # On tied maps amax splits the gradient equally; the original gives each the whole of it.
        return x.unfold(1, self.size, self.stride).amax(-1)
