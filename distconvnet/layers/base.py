"""The Layer contract shared by every cfg `type=`, the registry, and the weight-layer machinery.

A layer class is built from its layer-definition section and its (already built) input layers;
it parses and validates its keys in `parse`, records its output geometry, and runs in `forward`.
Keys that live in the layer-params file are read by `set_params`, which runs again on resume.

Tensor convention: a layer's output is (N, D) for flat outputs or (N, C, S, S) for image outputs;
both flatten to cuda-convnet2's channel-major per-case vector (index c·S·S + y·S + x), so a layer
that needs an image calls `as_image`, and one that needs a vector calls `x.flatten(1)`.
"""

import importlib
import math
import os

import numpy as np
import torch
from torch import nn

from ..cfg import REQUIRED
from ..errors import ConfigError
from ..schedule import parse_schedule

REGISTRY = {}


def register(type_name):
    """Class decorator: map cfg `type=type_name` to this class."""

    def wrap(cls):
        if type_name in REGISTRY:
            raise RuntimeError(f"layer type {type_name!r} registered twice")
        cls.type_name = type_name
        REGISTRY[type_name] = cls
        return cls

    return wrap


class BuildContext:
    """What a layer may know about the world at build time: the data provider's dimensions, and
    whether its cfg text comes from a checkpoint (see `WeightLayer.make_weights`)."""

    def __init__(self, data_dims, num_classes=None, from_checkpoint=False):
        self.data_dims = data_dims          # callable: dataIdx -> int, raises KeyError if absent
        self.num_classes = num_classes      # int or None when unknown (e.g. `summary`)
        self.from_checkpoint = from_checkpoint


class Layer(nn.Module):
    type_name = None          # set by @register
    description = "layer"     # words of the "Initialized <description> '<name>'" line
    num_inputs = 1            # exact count, or None for "at least min_inputs"
    min_inputs = 1
    needs_params = False      # the layer-params file must have a section for this layer
    is_data = False
    is_cost = False
    allows_neuron = True

    def __init__(self, sec, inputs, ctx):
        super().__init__()
        self.name = sec.name
        self.section = sec
        self.input_names = [layer.name for layer in inputs]
        self.channels = None      # set for image outputs, with img_size
        self.img_size = None
        self.outputs = None       # per-case dimension; derived from the image geometry if unset
        self.neuron = None if self.is_data else sec.str("neuron", None)
        if self.neuron is not None and not self.allows_neuron:
            raise sec.error(f"neuron= is not allowed on a layer of type {self.type_name}", "neuron")
        self._check_arity(sec, inputs)
        self.gpus = None if self.is_data else self._parse_gpus(sec, inputs)
        self.parse(sec, inputs, ctx)
        if self.outputs is None:
            self.outputs = self.channels * self.img_size * self.img_size

    # -- to implement ------------------------------------------------------------------------
    def parse(self, sec, inputs, ctx):
        """Read and validate definition keys; set self.outputs or (channels, img_size)."""
        raise NotImplementedError

    def set_params(self, sec):
        """Read this layer's layer-params section (None when the file has none for it, which
        only a layer that does not need_params is given: read_params checks)."""

    def read_params(self, sec, path):
        """Read this layer's section `sec` of the layer-params file `path` (None if it has none,
        which a layer that needs_params must not)."""
        if sec is None and self.needs_params:
            raise ConfigError(f"layer of type '{self.type_name}' requires extra parameters, "
                              f"but there is no [{self.name}] section", path, layer=self.name)
        self.set_params(sec)

    def forward(self, *xs):
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------
    @property
    def is_image(self):
        return self.channels is not None

    def output_words(self):
        if self.is_image:
            return f"{self.img_size}x{self.img_size} {self.channels}-channel output"
        return f"{self.outputs} outputs"

    def init_line(self):
        gpus = ", ".join(str(g) for g in self.gpus)
        return (f"Initialized {self.description} '{self.name}' on GPUs {gpus}, "
                f"producing {self.output_words()}")

    def _check_arity(self, sec, inputs):
        n = len(inputs)
        if self.num_inputs is not None and n != self.num_inputs:
            raise sec.error(f"a {self.type_name} layer takes {self.num_inputs} input(s), "
                            f"got {n}", "inputs")
        if self.num_inputs is None and n < self.min_inputs:
            raise sec.error(f"a {self.type_name} layer takes at least {self.min_inputs} "
                            f"inputs, got {n}", "inputs")

    def _parse_gpus(self, sec, inputs):
        if "gpu" not in sec:
            first = inputs[0] if inputs else None
            return list(first.gpus) if first is not None and first.gpus is not None else [0]
        gpus = sec.list("gpu", len(sec.raw("gpu").split(",")), int, what="an integer")
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise sec.error(f"gpu={sec.raw('gpu')!r}: expected distinct non-negative GPU indices",
                            "gpu")
        return gpus

    def image_geometry(self, sec, inp, key="channels"):
        """(channels, size) of an image input: channels from the cfg (or the input), S from D."""
        channels = sec.int(key, inp.channels if inp.channels is not None else None)
        if channels is None:
            raise sec.error(f"missing required key '{key}'")
        if channels <= 0:
            raise sec.error(f"{key}={channels}: expected a positive number", key)
        size = math.isqrt(inp.outputs // channels) if inp.outputs % channels == 0 else 0
        if size * size * channels != inp.outputs:
            raise sec.error(f"input '{inp.name}' has {inp.outputs} outputs per case, which is not "
                            f"{key}={channels} times a square image", key)
        return channels, size

    @staticmethod
    def as_image(x, channels, size):
        """View x as (N, C, S, S); x is either already that or any layout of the same values."""
        if x.dim() == 4 and x.shape[1:] == (channels, size, size):
            return x
        return x.reshape(x.shape[0], channels, size, size)

    def check_range(self, sec, key, value, low=None, high=None, what=None):
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (f"between {low} and {high}" if low is not None and high is not None
                      else f">= {low}" if low is not None else f"<= {high}")
            raise sec.error(f"{key}={value}: expected {what or bounds}", key)
        return value


def weight_owner(layers, name, index):
    """(layer name, index) of the matrix that `name`'s matrix `index` takes through weightSource,
    following chains; the matrix itself when its layer owns it. `layers` maps names to layers;
    sources are earlier matrices (model.py checks), so the chain ends."""
    while layers[name].weight_sources[index] is not None:
        name, index = layers[name].weight_sources[index]
    return name, index


class WeightLearning:
    """Per-layer learning hyper-parameters from the layer-params file (spec §5)."""

    def __init__(self, eps_w, eps_b, mom_w, mom_b, wc, wball, update_period,
                 wc_norm_max=None, wc_norm_min=None):
        self.eps_w, self.eps_b = eps_w, eps_b          # [Schedule] per input, Schedule
        self.mom_w, self.mom_b = mom_w, mom_b          # [float] per input, float
        self.wc, self.wball = wc, wball                # [float] per input
        self.update_period = update_period            # int, 0 = as often as possible
        self.wc_norm_max = wc_norm_max or [0.0] * len(eps_w)
        self.wc_norm_min = wc_norm_min or [0.0] * len(eps_w)

    def as_dict(self):
        return {"epsW": [s.to_dict() for s in self.eps_w], "epsB": self.eps_b.to_dict(),
                "momW": self.mom_w, "momB": self.mom_b, "wc": self.wc, "wball": self.wball,
                "updatePeriod": self.update_period, "wcNormMax": self.wc_norm_max,
                "wcNormMin": self.wc_norm_min}


class WeightLayer(Layer):
    """A layer with one weight matrix per input and one bias vector (conv, local, fc, sfc).

    Subclasses create their parameters in `parse` via `make_weights`, and translate between our
    tensor layout and cuda-convnet2's (rows, cols) matrices in `ccn2_shape`/`to_ccn2`/`from_ccn2`.
    """

    needs_params = True
    has_norm_constraint = False   # conv: wcNormMax / wcNormMin are accepted

    def make_weights(self, sec, ctx, shapes, bias_shape):
        """Create weights[i] (torch shapes) and biases, initialised as the cfg says (spec §4.5).

        initWFunc/initBFunc import and call Python code, so a cfg file that names them is code,
        as in the original: they run only for the files given on the command line. A net rebuilt
        from a checkpoint takes its weights from the checkpoint, and the cfg text stored there is
        data: its init functions are read but neither imported nor called."""
        self._check_memory(sec, sum(math.prod(s) for s in shapes) + math.prod(bias_shape))
        n = len(shapes)
        self.weight_sources = self._parse_weight_sources(sec, n)
        init_w = sec.list("initW", n, float, 0.01, what="a number")
        init_b = sec.float("initB", 0.0)
        w_func = sec.str("initWFunc", None)
        b_func = sec.str("initBFunc", None)
        if ctx.from_checkpoint:
            w_func = b_func = None
        self.weights = nn.ParameterList()
        for i, shape in enumerate(shapes):
            if w_func:
                w = self._call_init_func(sec, "initWFunc", w_func, i, self.ccn2_shape(i, shape))
                w = self.from_ccn2(i, w, shape)
            else:
                w = torch.randn(shape) * init_w[i]
            self.weights.append(nn.Parameter(w.float()))
        if b_func:
            b = self._call_init_func(sec, "initBFunc", b_func, None,
                                     self.ccn2_bias_shape(bias_shape))
            b = torch.as_tensor(np.asarray(b, dtype=np.float32)).reshape(bias_shape)
        else:
            b = torch.full(bias_shape, init_b)
        self.biases = nn.Parameter(b.float())

    @staticmethod
    def _check_memory(sec, numbers):
        """Refuse, before allocating, weights that cannot fit: float32 weights, their gradients
        and their momentum buffers, in this machine's memory."""
        needed = 3 * 4 * numbers
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):      # a system that does not say
            return
        if needed > available:
            raise sec.error(f"its {numbers:,} weights need {needed / 2**30:,.1f} GiB with their "
                            f"gradients and momentum, more than the {available / 2**30:,.1f} "
                            f"GiB of memory of this machine")

    def _parse_weight_sources(self, sec, n):
        if "weightSource" not in sec:
            return [None] * n
        sources = []
        for entry in sec.list("weightSource", n, str):
            if not entry:
                sources.append(None)
                continue
            name, _, idx = entry.partition("[")
            try:
                index = int(idx.rstrip("]")) if idx else 0
            except ValueError:
                raise sec.error(f"weightSource entry {entry!r}: expected layer or layer[idx]",
                                "weightSource") from None
            sources.append((name.strip(), index))
        return sources

    def _call_init_func(self, sec, key, spec, input_idx, shape):
        path, paren, args = spec.partition("(")
        module_name, _, func_name = path.rpartition(".")
        if not module_name or not func_name:
            raise sec.error(f"{key}={spec!r}: expected module.function(params)", key)
        args = args.rstrip(")") if paren else ""
        params = [p.strip() for p in args.split(",")] if args else []
        try:
            func = getattr(importlib.import_module(module_name), func_name)
            out = (func(self.name, input_idx, shape, params=params) if input_idx is not None
                   else func(self.name, shape, params=params))
        except Exception as e:  # user code: report whatever it raised, in one line
            raise sec.error(f"{key}={spec!r} failed: {type(e).__name__}: {e}", key) from None
        out = np.asarray(out, dtype=np.float32)
        if out.shape != tuple(shape):
            raise sec.error(f"{key}={spec!r} returned shape {out.shape}, expected {tuple(shape)}",
                            key)
        return out

    def set_params(self, sec):
        n = len(self.weights)

        def schedules(key, count):
            out = []
            for text in sec.list(key, count, str):
                try:
                    s = parse_schedule(text)
                except ValueError as e:
                    raise sec.error(str(e), key) from None
                if s.params.get("base", 0) < 0:
                    raise sec.error(f"{key}={text!r}: a learning rate must not be negative", key)
                out.append(s)
            return out

        def floats(key, default=REQUIRED, low=None, high=None):
            values = sec.list(key, n, float, default, what="a number")
            for v in values:
                self.check_range(sec, key, v, low, high)
            return values

        mom_b = sec.float("momB")
        self.check_range(sec, "momB", mom_b, 0.0, 1.0)
        norm_max = norm_min = None
        if self.has_norm_constraint:
            norm_max = floats("wcNormMax", 0.0, low=0.0)
            norm_min = floats("wcNormMin", 0.0, low=0.0)
            for hi, lo in zip(norm_max, norm_min):
                if lo > hi:
                    raise sec.error(f"wcNormMin={lo:g} exceeds wcNormMax={hi:g}", "wcNormMin")
        self.learning = WeightLearning(
            eps_w=schedules("epsW", n), eps_b=schedules("epsB", 1)[0],
            mom_w=floats("momW", low=0.0, high=1.0), mom_b=mom_b,
            wc=floats("wc", 0.0, low=0.0), wball=floats("wball", 0.0, low=0.0),
            update_period=self.check_range(sec, "updatePeriod", sec.int("updatePeriod", 0), 0),
            wc_norm_max=norm_max, wc_norm_min=norm_min)
        sec.raw("superEps", None)   # parsed but unused, as in cuda-convnet2
        sec.raw("superMom", None)

    # -- layout translation, per subclass ---------------------------------------------------
    def ccn2_shape(self, i, torch_shape):
        raise NotImplementedError

    def to_ccn2(self, i, tensor):
        raise NotImplementedError

    def from_ccn2(self, i, array, torch_shape):
        raise NotImplementedError

    def ccn2_bias_shape(self, torch_shape):
        return (1, int(np.prod(torch_shape)))
