"""From the two cfg files to one nn.Module: the layer DAG in file order (spec §4).

Single-device code: it never mentions ranks or devices. Placement across GPUs is applied from
outside (distconvnet.parallel).
"""

from typing import NamedTuple

import torch
from torch import nn

from .cfg import read_cfg
from .errors import ConfigError
from .layers import REGISTRY, BuildContext, WeightLayer

_STRUCTURAL_KEYS = ("type", "inputs")
_EMPTY_MODULE_DICT = nn.ModuleDict()


class NetOutput(NamedTuple):
    objective: torch.Tensor   # Σ coeff × cost, the scalar that backward() starts from
    costs: dict               # printed cost name -> tensor of per-batch sums (children folded in)
    acts: dict                # layer name -> output, for the layers asked for in `keep`


class ConvNet(nn.Module):
    """The net of a layer-definition file, with the hyper-parameters of a layer-params file."""

    def __init__(self, layer_def, layer_params, ctx, layer_def_text=None, layer_params_text=None):
        super().__init__()
        self.layer_def_path = layer_def
        self.warnings = []
        self.layers = nn.ModuleDict()
        self._build(read_cfg(layer_def, layer_def_text), ctx)
        self.apply_params(layer_params, layer_params_text)

    @classmethod
    def from_checkpoint(cls, path, layer_def_text, ctx, layer_params=None,
                        layer_params_text=None):
        """The net of the layer definition stored in checkpoint `path`, with the layer-params
        file `layer_params` (default: the text stored with it, `layer_params_text`).

        The stored text is data: its init functions are not run (the weights come from the
        checkpoint), and its mistakes are reported against the checkpoint, not against a
        layer-definition file that the user may never have seen with that text."""
        if layer_params is None:
            layer_params = f"{path} (the layer parameters stored in it)"
        return cls(f"{path} (the layer definition stored in it)", layer_params,
                   BuildContext(ctx.data_dims, ctx.num_classes, from_checkpoint=True),
                   layer_def_text=layer_def_text, layer_params_text=layer_params_text)

    # -- building ----------------------------------------------------------------------------
    def _build(self, cfg, ctx):
        if not cfg.sections:
            raise ConfigError("defines no layers (expected sections such as [data] with "
                              "type=data)", cfg.path)
        resolve = {}        # name in the cfg -> name of the layer that carries its output
        unknown = []
        for sec in cfg.sections:
            _check_name(sec)
            type_name = sec.str("type")
            cls = REGISTRY.get(type_name)
            if cls is None:
                raise sec.error(f"unknown layer type '{type_name}' (known: "
                                f"{', '.join(sorted(REGISTRY))})", "type")
            inputs = self._inputs_of(sec, cls, cfg, resolve)
            layer = cls(sec, inputs, ctx)
            self.layers[sec.name] = layer
            self.warnings += getattr(layer, "warnings", [])
            resolve[sec.name] = sec.name
            unknown += [(sec, k) for k in sec.unused_keys() if k not in _STRUCTURAL_KEYS]
            if layer.neuron is not None:
                name = self._free_name(f"{sec.name}_neuron", cfg)
                nsec = sec.derive(name, {"type": "neuron", "inputs": sec.name,
                                         "neuron": layer.neuron}, "neuron")
                self.layers[name] = REGISTRY["neuron"](nsec, [layer], ctx)
                resolve[sec.name] = name
        if unknown:
            listed = ", ".join(f"{s.name}.{k} (line {s._key_lines.get(k, s.line)})"
                               for s, k in unknown)
            self.warnings.append(f"{cfg.path}: unknown keys ignored: {listed}")
        self._check_unused(cfg)
        self._share_weights(cfg)
        self._wire_costs(cfg)

    def _free_name(self, name, cfg):
        """`name`, or `name_1`, `name_2`, ... if a layer of the file already has it."""
        base, k = name, 1
        while name in self.layers or name in cfg:
            name, k = f"{base}_{k}", k + 1
        return name

    def _inputs_of(self, sec, cls, cfg, resolve):
        if cls.num_inputs == 0:
            return []
        names = [n.strip() for n in sec.str("inputs").split(",")]
        inputs = []
        for name in names:
            if name == sec.name:
                raise sec.error("a layer cannot be its own input", "inputs")
            if name not in resolve:
                where = "is defined after it" if name in cfg else "does not exist"
                raise sec.error(f"input layer '{name}' {where}", "inputs")
            inputs.append(self.layers[resolve[name]])
        return inputs

    def _check_unused(self, cfg):
        consumed = {n for layer in self.layers.values() for n in layer.input_names}
        for name, layer in self.layers.items():
            if name not in consumed and not layer.is_cost:
                sec = cfg.get(name) or layer.section
                raise sec.error(f"layer of type '{layer.type_name}' is unused "
                                f"(no layer takes it as input)")

    def _share_weights(self, cfg):
        """weightSource: each receiving matrix starts as a copy of its source's and stays a
        tensor of its own, so that its gradient is its own layer's. The optimizer adds that
        gradient into the owner's increment at the rate the original gave it, and copies the
        owner's values back after each update (optim.py)."""
        earlier = {}
        for layer in self.weight_layers():
            earlier[layer.name] = layer
            for i, source in enumerate(layer.weight_sources):
                if source is None:
                    continue
                name, idx = source
                sec = layer.section
                src = earlier.get(name)
                if src is None or (src is layer and idx >= i):
                    raise sec.error(f"weightSource '{name}[{idx}]' names no earlier weight "
                                    f"matrix", "weightSource")
                if src.type_name != layer.type_name or idx >= len(src.weights):
                    raise sec.error(f"weightSource '{name}[{idx}]' must be matrix {idx} of a "
                                    f"{layer.type_name} layer", "weightSource")
                if src.gpus != layer.gpus or src.weights[idx].shape != layer.weights[i].shape:
                    raise sec.error(f"weightSource '{name}[{idx}]' has shape "
                                    f"{tuple(src.weights[idx].shape)} on GPUs {src.gpus}; "
                                    f"input {i} needs {tuple(layer.weights[i].shape)} on GPUs "
                                    f"{layer.gpus}", "weightSource")
                layer.weights[i] = nn.Parameter(src.weights[idx].detach().clone())

    def _wire_costs(self, cfg):
        """Children fold into their parent's printed values; softmax->logreg gets the logits."""
        self.children_of = {}
        for layer in self.cost_layers():
            for child in getattr(layer, "children_names", []):
                other = self.layers[child] if child in self.layers else None
                if other is None or other.type_name != layer.type_name:
                    raise layer.section.error(f"children: '{child}' is not a "
                                              f"{layer.type_name} layer", "children")
                self.children_of.setdefault(layer.name, []).append(child)
        folded = {c for cs in self.children_of.values() for c in cs}
        self.printed_costs = [layer.name for layer in self.cost_layers()
                              if layer.name not in folded]
        consumers = {}
        for layer in self.layers.values():
            for n in layer.input_names:
                consumers.setdefault(n, []).append(layer.name)
        self.logits_for = {}
        for layer in self.cost_layers():
            probs = getattr(layer, "probs_input", None)
            if probs is None:
                continue
            src = self.layers[probs]
            if src.type_name == "softmax" and consumers.get(probs) == [layer.name]:
                self.logits_for[layer.name] = src.input_names[0]

    def apply_params(self, layer_params, text=None):
        """(Re-)read the layer-params file; on resume this is how learning rates change."""
        cfg = read_cfg(layer_params, text)
        self.layer_params_path = layer_params
        for name, layer in self.layers.items():
            layer.read_params(cfg.get(name), layer_params)
        stray = [s.name for s in cfg.sections if s.name not in self.layers]
        unknown = [f"{s.name}.{k} (line {s._key_lines.get(k, s.line)})" for s in cfg.sections
                   if s.name in self.layers for k in s.unused_keys()]
        if stray:
            self.warnings.append(f"{layer_params}: sections for no layer ignored: "
                                 f"{', '.join(stray)}")
        if unknown:
            self.warnings.append(f"{layer_params}: unknown keys ignored: {', '.join(unknown)}")

    # -- queries -----------------------------------------------------------------------------
    def weight_layers(self):
        return [layer for layer in self.layers.values() if isinstance(layer, WeightLayer)]

    def cost_layers(self):
        return [layer for layer in self.layers.values() if layer.is_cost]

    def reads(self):
        """{layer: the layers it reads}: its inputs, and for a logreg cost fed by a softmax the
        softmax's input too (logits_for), which it reads directly."""
        return {name: list(layer.input_names) + ([self.logits_for[name]]
                                                 if name in self.logits_for else [])
                for name, layer in self.layers.items()}

    def init_lines(self):
        """The original's startup lines: data layers, other layers, then neuron layers."""
        def rank(layer):
            return 0 if layer.is_data else 2 if layer.type_name == "neuron" else 1
        ordered = sorted(self.layers.values(), key=rank)
        return [layer.init_line() for layer in ordered]

    def num_parameters(self):
        """Trainable values; a matrix shared through weightSource counts once."""
        copies = sum(w.numel() for layer in self.weight_layers()
                     for w, source in zip(layer.weights, layer.weight_sources)
                     if source is not None)
        return sum(p.numel() for p in self.parameters()) - copies

    # -- running -----------------------------------------------------------------------------
    def forward(self, mats, keep=()):
        acts, costs = {}, {}
        objective = None
        for name, layer in self.layers.items():
            if layer.is_data:
                acts[name] = layer(mats)
                continue
            xs = [acts[n] for n in layer.input_names]
            if layer.is_cost:
                logits = acts.get(self.logits_for.get(name))
                obj, values = layer(*xs, logits=logits) if logits is not None else layer(*xs)
                objective = obj if objective is None else objective + obj
                costs[name] = values
            else:
                acts[name] = layer(*xs)
        return NetOutput(objective, self.fold_children(costs), {k: acts[k] for k in keep})

    def fold_children(self, costs):
        """Add each child cost's sums into its parent's; children are not printed (spec §4.3)."""
        costs = dict(costs)
        for parent, children in self.children_of.items():
            costs[parent] = costs[parent] + sum(costs.pop(c) for c in children)
        return costs


def _check_name(sec):
    """Layers are torch submodules, named by their section: torch refuses names with '.' and
    the names of nn.ModuleDict's own attributes (train, eval, keys, ...)."""
    if "." in sec.name:
        raise sec.error("a layer name cannot contain '.'")
    if hasattr(_EMPTY_MODULE_DICT, sec.name):
        raise sec.error(f"'{sec.name}' cannot name a layer: torch's ModuleDict reserves it")
