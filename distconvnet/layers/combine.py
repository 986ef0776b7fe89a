"""Layers that combine several inputs: `concat`, `pass`, `eltsum` and `eltmax` (spec §4.3).

concat and pass join the inputs' per-case channel-major vectors end to end. When every input is
an image of the same size this is a concatenation along channels (same memory order), and the
output keeps that image geometry for the layers above; otherwise the vectors are flattened.
eltsum and eltmax work element by element on inputs of equal dimension and keep the first
input's shape and geometry.
"""

import torch

from .base import Layer, register


def _same_shape(xs):
    """The inputs reshaped to the first one's shape: equal dimensions, so equal memory order."""
    shape = xs[0].shape
    return [x if x.shape == shape else x.reshape(shape) for x in xs]


class JoinLayer(Layer):
    """concat and pass: the output is the inputs' vectors, one after the other."""

    num_inputs = None

    def parse(self, sec, inputs, ctx):
        self.outputs = sum(inp.outputs for inp in inputs)
        sizes = {inp.img_size for inp in inputs}
        if all(inp.channels is not None for inp in inputs) and len(sizes) == 1:
            self.channels, self.img_size = sum(inp.channels for inp in inputs), sizes.pop()

    def output_words(self):
        return f"{self.outputs} outputs"     # the original prints these flat

    def forward(self, *xs):
        if all(x.dim() == 4 for x in xs) and len({x.shape[2:] for x in xs}) == 1:
            return torch.cat(xs, dim=1)
        return torch.cat([x.flatten(1) for x in xs], dim=1)


@register("concat")
class ConcatenationLayer(JoinLayer):
    description = "concatenation layer"


@register("pass")
class PassThroughLayer(JoinLayer):
    """The original makes this zero-copy by placing its inputs in one buffer; here it copies,
    which gives the same values and gradients (the buffer trick is a memory optimisation)."""

    description = "pass-through layer"

    def parse(self, sec, inputs, ctx):
        replicas = {len(inp.gpus) for inp in inputs if inp.gpus is not None}
        if replicas and replicas != {len(self.gpus)}:
            raise sec.error(f"a pass-through layer must have as many replicas as its inputs: it "
                            f"runs on {len(self.gpus)} GPU(s), its inputs on "
                            f"{', '.join(str(r) for r in sorted(replicas))}", "gpu")
        super().parse(sec, inputs, ctx)


class ElementwiseLayer(Layer):
    """eltsum and eltmax: inputs of equal dimension, output shaped like the first input."""

    num_inputs = None

    def parse(self, sec, inputs, ctx):
        dims = [inp.outputs for inp in inputs]
        if len(set(dims)) != 1:
            raise sec.error(f"all inputs must have the same dimensionality, got "
                            f"{', '.join(str(d) for d in dims)}", "inputs")
        first = inputs[0]
        self.channels, self.img_size, self.outputs = first.channels, first.img_size, first.outputs

    def output_words(self):
        return f"{self.outputs} outputs"     # the original prints these flat


@register("eltsum")
class EltwiseSumLayer(ElementwiseLayer):
    description = "elementwise sum layer"
    needs_params = True     # coeffs live in the layer-params file (spec §5, §15.10)

    def parse(self, sec, inputs, ctx):
        super().parse(sec, inputs, ctx)
        self.coeffs = [1.0] * len(inputs)

    def set_params(self, sec):
        n = len(self.input_names)
        self.coeffs = sec.list("coeffs", n, float, [1.0] * n, what="a number")

    def forward(self, *xs):
        xs = _same_shape(xs)
        out = xs[0] * self.coeffs[0]
        for x, coeff in zip(xs[1:], self.coeffs[1:]):
            out = torch.add(out, x, alpha=coeff)
        return out


class _EltwiseMax(torch.autograd.Function):
    """max over the inputs; backward gives each input the gradient wherever it equals the max,
    so tied inputs all receive it in full (the original's kEltwiseMaxGrad)."""

    @staticmethod
    def forward(ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = torch.maximum(out, x)
        ctx.save_for_backward(out, *xs)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, *xs = ctx.saved_tensors
        return tuple(grad * (x == out) for x in xs)


@register("eltmax")
class EltwiseMaxLayer(ElementwiseLayer):
    description = "elementwise max layer"
    min_inputs = 2

    def forward(self, *xs):
        return _EltwiseMax.apply(*_same_shape(xs))
