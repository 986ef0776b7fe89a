"""The `neuron` layer: an element-wise activation (spec §4.4).

It is also what a `neuron=<spec>` key on another layer becomes: model.py builds a separate
`<layer>_neuron` layer of this type from a derived section (spec §4.1).

Gradients follow the original engine (neuron.cuh), which sometimes differs from the textbook
derivative at a kink: relu and brelu pass the gradient only where the output is strictly inside
(0, ∞) or (0, a), and abs uses the slope −1 at x = 0.
"""

import re

import torch
import torch.nn.functional as F

from .base import Layer, register


def _bounded_relu(x, a):
    # hardtanh passes the gradient only where min < x < max, as the original's 0 < out < a
    return F.hardtanh(x, 0.0, a)


def _abs(x):
    # slope +1 where x > 0 and −1 elsewhere, including x = 0 (the original's AbsGradientOperator)
    return torch.where(x > 0, x, -x)


def _soft_relu(x):
    # the engine returns x itself when x > 4 (spec §4.4); softplus's threshold does exactly that
    return F.softplus(x, beta=1.0, threshold=4.0)


class NeuronType:
    """One entry of the table: its name, parameter names, formula (as the original prints it)."""

    def __init__(self, name, params, formula, function):
        self.name, self.params, self.formula, self.function = name, params, formula, function

    @property
    def usage(self):
        return f"{self.name}[{','.join(self.params)}]" if self.params else self.name


NEURON_TYPES = {t.name: t for t in [
    NeuronType("abs", (), "f(x) = |x|", _abs),
    NeuronType("brelu", ("a",), "f(x) = min(a, max(0, x))", _bounded_relu),
    NeuronType("drelu", ("a",), "f(x) = x - a * tanh(x / a)",
               lambda x, a: x - a * torch.tanh(x / a)),
    NeuronType("ident", (), "f(x) = x", lambda x: x),
    NeuronType("linear", ("a", "b"), "f(x) = a * x + b", lambda x, a, b: a * x + b),
    NeuronType("log", ("a",), "f(x) = log(a + x)", lambda x, a: torch.log(a + x)),
    NeuronType("logistic", (), "f(x) = 1 / (1 + e^-x)", torch.sigmoid),
    NeuronType("relu", (), "f(x) = max(0, x)", F.relu),
    NeuronType("softrelu", (), "f(x) = log(1 + e^x)", _soft_relu),
    NeuronType("sqrt", (), "f(x) = sqrt(x)", torch.sqrt),
    NeuronType("square", (), "f(x) = x^2", lambda x: x * x),
    NeuronType("tanh", ("a", "b"), "f(x) = a * tanh(b * x)", lambda x, a, b: a * torch.tanh(b * x)),
]}

# Accepted by the original's Python parser but never implemented by its engine (spec §15.11).
UNSUPPORTED = {"nrelu": "f(x) = max(0, x) + noise"}

_SPEC_RE = re.compile(r"^\s*(?P<name>\w+)\s*(?:\[(?P<params>[^\]]*)\])?\s*$")


def valid_types_text():
    return "; ".join(f"{t.usage}: {t.formula}" for t in NEURON_TYPES.values())


def parse_neuron(sec, spec, key="neuron"):
    """`tanh[1.7159,0.6667]` -> (NeuronType, [1.7159, 0.6667]); a ConfigError says what is valid."""
    match = _SPEC_RE.match(spec)
    name = match.group("name") if match else None
    if name in UNSUPPORTED:
        raise sec.error(f"neuron type '{spec}' is not supported: cuda-convnet2's engine never "
                        f"implemented it ({name}: {UNSUPPORTED[name]})", key)
    kind = NEURON_TYPES.get(name)
    params = None
    if kind is not None:
        text = match.group("params")
        try:
            params = [float(v) for v in text.split(",")] if text is not None else []
        except ValueError:
            params = None
    if kind is None or params is None or len(params) != len(kind.params):
        raise sec.error(f"unable to parse neuron type '{spec}'. Valid neuron types: "
                        f"{valid_types_text()}. Where neurons have parameters, they must be "
                        f"floats, e.g. tanh[1.7159,0.6667]", key)
    if name == "brelu" and not params[0] > 0:
        raise sec.error(f"neuron type '{spec}': expected a positive bound a", key)
    if name == "drelu" and params[0] == 0:
        raise sec.error(f"neuron type '{spec}': a must not be 0 (f divides by it)", key)
    return kind, params


@register("neuron")
class NeuronLayer(Layer):
    description = "neuron layer"

    def parse(self, sec, inputs, ctx):
        self.neuron_spec = sec.str("neuron")
        self.neuron_type, self.neuron_params = parse_neuron(sec, self.neuron_spec)
        # neuron= is this layer's own definition, not an activation to attach above it
        self.neuron = None
        inp = inputs[0]
        self.channels, self.img_size, self.outputs = inp.channels, inp.img_size, inp.outputs

    def output_words(self):
        return f"{self.outputs} outputs"     # the original prints neuron layers flat

    def forward(self, x):
        return self.neuron_type.function(x, *self.neuron_params)
