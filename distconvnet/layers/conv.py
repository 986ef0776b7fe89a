"""`conv` (shared filters) and `local` (unshared, a filter bank per output position).

Both window their inputs the cuda-convnet2 way (spec §6.2): output width
M = 1 + ceil((2·padding + S − filterSize) / stride), and the last window may hang past the padded
image on the right/bottom, where the missing pixels are zeros. We reproduce that by padding
`padding` on the left/top and `right_pad` on the right/bottom, so the plain (floor-mode) window
count of the padded image is exactly M.

Weight layouts, ours ↔ the original's (rows, cols) matrices of spec §4.5 (k = filterSize,
Cf = channels/groups, F = filters·groups, Fg = filters per group):
  conv   torch (F, Cf, k, k)           ↔ (k²·Cf, F), row = channel·k² + y·k + x, col = filter
  local  torch (M², groups, k²·Cf, Fg) ↔ (M²·k²·Cf, F), module-major:
         row = module·k²·Cf + channel·k² + y·k + x, col = group·Fg + filter in group
Unshared biases are filter-major, (F, M, M) ↔ (F·M², 1), the order of the layer's output
(spec §4.3); shared conv biases are (F,) ↔ (F, 1).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..cfg import REQUIRED
from .base import WeightLayer, register

# Under reduced-precision autocast (the bf16 fast path) a conv for which space_to_depth_pays runs
# as space_to_depth_conv; False keeps the plain conv everywhere, to time one against the other.
SPACE_TO_DEPTH = True


def _tensor_core_channels(channels):
    """cuDNN's tensor-core kernels take channel counts in multiples of 8 and pad to get them."""
    return -(-channels // 8) * 8


def space_to_depth_conv(x, weight, bias, windows):
    """The conv of `windows` at stride s as an exactly equal stride-1 conv over s×s pixel blocks.

    Each block of the padded input becomes C·s² channels, numbered c·s² + dy·s + dx (c-major,
    so a group's channels stay together), and the weight, zero-padded to k' = s·ceil(k/s) taps,
    is folded the same way: every product of the plain conv occurs once, the added taps multiply
    zeros. The right/bottom padding grows by k' − k, making the padded extent s·(M−1) + k', a
    multiple of s that holds exactly M stride-1 windows of k'/s blocks: nothing to slice off.
    The folded input is written channels_last, the layout cuDNN's NHWC kernels read, in the one
    copy the fold needs (under torch.compile the padding fuses into it too).
    """
    s, k, p = windows.stride, windows.filter_size, windows.padding
    grown = -k % s
    r = windows.right_pad + grown
    x = F.pad(x, (p, r, p, r))
    n, c, size, _ = x.shape
    blocks = size // s
    x = (x.view(n, c, blocks, s, blocks, s).permute(0, 2, 4, 1, 3, 5)
         .reshape(n, blocks, blocks, c * s * s).permute(0, 3, 1, 2))
    filters, filter_channels = weight.shape[:2]
    taps = (k + grown) // s
    weight = (F.pad(weight, (0, grown, 0, grown))
              .view(filters, filter_channels, taps, s, taps, s).permute(0, 1, 3, 5, 2, 4)
              .reshape(filters, filter_channels * s * s, taps, taps))
    return F.conv2d(x, weight, bias, 1, 0, 1, windows.groups)


class InputWindows:
    """How one input is cut into windows: its per-input cfg keys and the padding they imply."""

    def __init__(self, channels, img_size, filter_size, padding, stride, groups, filters):
        self.channels, self.img_size = channels, img_size
        self.filter_size, self.padding, self.stride = filter_size, padding, stride
        self.groups, self.filters = groups, filters      # filters: the per-group count
        self.modules_x = None                            # set once all inputs agree on M

    @property
    def filter_channels(self):
        return self.channels // self.groups

    def auto_modules_x(self):
        """M in ceil mode (spec §6.2); exact integer ceil of a non-negative ratio."""
        span = 2 * self.padding + self.img_size - self.filter_size
        return 1 + -(-span // self.stride)

    def covered_extent(self, modules_x):
        """Last image column + 1 that the windows reach (spec §4.3 coverage rule)."""
        return -self.padding + self.stride * (modules_x - 1) + self.filter_size

    @property
    def right_pad(self):
        """Zero columns (and rows) the last window needs past the image's right/bottom edge."""
        return self.covered_extent(self.modules_x) - self.img_size

    def space_to_depth_pays(self):
        """Whether space_to_depth_conv does fewer tensor-core multiply-adds than the plain conv.

        Per output value the plain conv does C·k² of them, but with C rounded up to a multiple
        of 8; the rewrite does C·s²·(k'/s)². Few channels and a large stride win: imagenet
        conv1 (C=3, k=11, s=4) does 48·3² = 432 instead of 8·11² = 968 and drops the copy that
        pads 3 channels to 8; at 64 channels, k=3, s=2 the rewrite would do 1024 instead of 576.
        """
        s, k, c = self.stride, self.filter_size, self.filter_channels
        taps = -(-k // s)
        return s > 1 and (_tensor_core_channels(c * s * s) * taps * taps
                          < _tensor_core_channels(c) * k * k)

    def padded(self, x):
        """x with `padding` zeros left/top and `right_pad` right/bottom (spec §6.2)."""
        p, r = self.padding, self.right_pad
        return F.pad(x, (p, r, p, r)) if p or r else x

    def image(self, x):
        """View an input as (N, C, S, S); a 4-D input of another shape is reinterpreted through
        its channel-major vector, since cuda-convnet2 only looks at the flat dimension."""
        if x.dim() == 4 and x.shape[1:] == (self.channels, self.img_size, self.img_size):
            return x
        return x.reshape(x.shape[0], self.channels, self.img_size, self.img_size)


class WindowedWeightLayer(WeightLayer):
    """What conv and local share: the per-input window keys, their validation, and M."""

    num_inputs = None

    def parse_windows(self, sec, inputs):
        """Read the per-input keys, validate them, and set self.windows, modules_x, channels."""
        n = len(inputs)

        def ints(key, default=REQUIRED):
            return sec.list(key, n, int, default, what="an integer")

        known_channels = [inp.channels for inp in inputs]
        channels = ints("channels", REQUIRED if None in known_channels else known_channels)
        filters, filter_size = ints("filters"), ints("filterSize")
        padding, stride, groups = ints("padding", 0), ints("stride", 1), ints("groups", 1)
        modules_x = self.check_range(sec, "modulesX", sec.int("modulesX", 0), 0)

        self.windows = []
        for i, inp in enumerate(inputs):
            of = f" (input '{inp.name}')" if n > 1 else ""
            for key, values, low in (("channels", channels, 1), ("filters", filters, 1),
                                     ("filterSize", filter_size, 1), ("padding", padding, 0),
                                     ("stride", stride, 1), ("groups", groups, 1)):
                if values[i] < low:
                    raise sec.error(f"{key}={values[i]}{of}: expected >= {low}", key)
            size = self._square_size(sec, inp, channels[i])
            self.windows.append(self._check_window(sec, of, InputWindows(
                channels[i], size, filter_size[i], padding[i], stride[i], groups[i],
                filters[i])))

        self.modules_x = modules_x or self._common_auto_modules_x(sec, inputs)
        self.filters = self.windows[0].filters * self.windows[0].groups
        if any(w.filters * w.groups != self.filters for w in self.windows):
            raise sec.error("all inputs must produce the same output; they give "
                            + self._output_list(inputs, [self.modules_x] * n), "filters")
        for inp, w in zip(inputs, self.windows):
            w.modules_x = self.modules_x
            # always met by the auto M; an explicit modulesX may fall short of the image
            reach = w.covered_extent(self.modules_x)
            if reach < w.img_size:
                of = f" (input '{inp.name}')" if n > 1 else ""
                raise sec.error(f"a {self.modules_x}x{self.modules_x} output with padding="
                                f"{w.padding}, stride={w.stride}, filterSize={w.filter_size} "
                                f"does not cover the {w.img_size}x{w.img_size} input{of}: "
                                f"-padding + stride*(modulesX-1) + filterSize = {reach} < "
                                f"{w.img_size}", "modulesX")
        self.channels, self.img_size = self.filters, self.modules_x

    @staticmethod
    def _square_size(sec, inp, channels):
        size = math.isqrt(inp.outputs // channels)
        if size * size * channels != inp.outputs:
            raise sec.error(f"input '{inp.name}' has {inp.outputs} outputs per case, which is "
                            f"not channels={channels} times a square image", "channels")
        return size

    @staticmethod
    def _check_window(sec, of, w):
        if w.filter_size > w.img_size + 2 * w.padding:
            raise sec.error(f"filterSize={w.filter_size}{of} is larger than the padded input "
                            f"({w.img_size} + 2*{w.padding} = {w.img_size + 2 * w.padding})",
                            "filterSize")
        # cuda-convnet2 requires it (spec §15 item 19); larger strides would skip pixels.
        if w.stride > w.filter_size:
            raise sec.error(f"stride={w.stride}{of} exceeds filterSize={w.filter_size}",
                            "stride")
        if w.channels % w.groups:
            raise sec.error(f"channels={w.channels}{of} is not divisible by groups={w.groups}",
                            "groups")
        return w

    def _common_auto_modules_x(self, sec, inputs):
        sizes = [w.auto_modules_x() for w in self.windows]
        if len(set(sizes)) > 1:
            raise sec.error("all inputs must produce the same output; they give "
                            + self._output_list(inputs, sizes), "filterSize")
        return sizes[0]

    def _output_list(self, inputs, sizes):
        return ", ".join(f"'{inp.name}': {w.filters * w.groups}x{m}x{m}"
                         for inp, w, m in zip(inputs, self.windows, sizes))

    def ccn2_bias_shape(self, torch_shape):
        return (int(np.prod(torch_shape)), 1)


@register("conv")
class ConvLayer(WindowedWeightLayer):
    description = "convolutional layer"
    has_norm_constraint = True      # wcNormMax / wcNormMin in the params file (spec §5)

    def parse(self, sec, inputs, ctx):
        self.parse_windows(sec, inputs)
        # sumWidth only tuned the original's weight-gradient kernel: read (so it is neither
        # flagged unknown nor left unchecked) but optional, unlike the original (spec §15 item 9).
        self.sum_width = sec.int("sumWidth", None)
        if self.sum_width is not None:
            self.check_range(sec, "sumWidth", self.sum_width, 1)
        self.shared_biases = sec.bool("sharedBiases", True)
        bias_shape = ((self.filters,) if self.shared_biases
                      else (self.filters, self.modules_x, self.modules_x))
        self.make_weights(sec, ctx, [(w.filters * w.groups, w.filter_channels, w.filter_size,
                                      w.filter_size) for w in self.windows], bias_shape)

    def forward(self, *xs):
        # Autocast is what separates the fast path from the bit-for-bit fp32 reference path
        # (fastpath.autocast), in training and evaluation alike, and torch.compile guards on it.
        device = xs[0].device.type
        fast = SPACE_TO_DEPTH and torch.is_autocast_enabled(device)
        out = None
        for i, (x, w, weight) in enumerate(zip(xs, self.windows, self.weights)):
            bias = self.biases if i == 0 and self.shared_biases else None
            x = w.image(x)
            if fast and w.space_to_depth_pays():
                # the conv would cast it anyway; casting first halves the bytes the fold moves
                y = space_to_depth_conv(x.to(torch.get_autocast_dtype(device)), weight, bias, w)
            elif w.right_pad == w.padding:     # symmetric: let the conv kernel pad, no copy
                y = F.conv2d(x, weight, bias, w.stride, w.padding, 1, w.groups)
            else:
                y = F.conv2d(w.padded(x), weight, bias, w.stride, 0, 1, w.groups)
            out = y if out is None else out + y
        return out if self.shared_biases else out + self.biases

    def ccn2_shape(self, i, torch_shape):
        out_channels, filter_channels, k, _ = torch_shape
        return (filter_channels * k * k, out_channels)

    def to_ccn2(self, i, tensor):
        matrix = tensor.detach().cpu().reshape(tensor.shape[0], -1).t()
        return np.array(matrix.numpy(), dtype=np.float32, order="C")

    def from_ccn2(self, i, array, torch_shape):
        matrix = torch.as_tensor(np.asarray(array, dtype=np.float32))
        return matrix.t().reshape(torch_shape).contiguous()


@register("local")
class LocalLayer(WindowedWeightLayer):
    description = "locally-connected layer"

    def parse(self, sec, inputs, ctx):
        self.parse_windows(sec, inputs)
        modules = self.modules_x * self.modules_x
        self.make_weights(sec, ctx, [(modules, w.groups, w.filter_channels * w.filter_size ** 2,
                                      w.filters) for w in self.windows],
                          (self.filters, self.modules_x, self.modules_x))

    def forward(self, *xs):
        out = self.biases
        for x, w, weight in zip(xs, self.windows, self.weights):
            x = w.image(x)
            n = x.shape[0]
            # (N, C·k², M²) with row c·k² + y·k + x, the order of the original's filter rows
            cols = F.unfold(w.padded(x), w.filter_size, stride=w.stride)
            cols = cols.reshape(n, w.groups, -1, cols.shape[-1])
            # one batched matmul over (module, group): (N, J) @ (J, filters)
            y = torch.einsum("ngjl,lgjf->ngfl", cols, weight)
            out = out + y.reshape(n, self.filters, self.modules_x, self.modules_x)
        return out

    def ccn2_shape(self, i, torch_shape):
        modules, groups, rows_per_module, filters = torch_shape
        return (modules * rows_per_module, groups * filters)

    def to_ccn2(self, i, tensor):
        modules, groups, rows_per_module, filters = tensor.shape
        matrix = tensor.detach().cpu().permute(0, 2, 1, 3).reshape(modules * rows_per_module,
                                                                   groups * filters)
        return np.array(matrix.numpy(), dtype=np.float32, order="C")

    def from_ccn2(self, i, array, torch_shape):
        modules, groups, rows_per_module, filters = torch_shape
        matrix = torch.as_tensor(np.asarray(array, dtype=np.float32))
        return matrix.reshape(modules, rows_per_module, groups, filters).permute(0, 2, 1, 3) \
                     .contiguous()
