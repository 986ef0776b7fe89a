"""--unshare-weights and --conv-to-local: edits applied once to a net loaded from a checkpoint
(spec §3.2). They rewrite the stored layer-definition text, the model's state dict and the
optimizer's state dict together, so the net rebuilt from the edited text loads the edited state.

The functions never change their inputs; `net` (the ConvNet built from the unedited text) is only
read, for the geometry and sharing that the text alone does not give.
"""

import copy
import re

import torch

from .errors import OptionError
from .layers import weight_owner

WEIGHTS, BIASES = "weights", "biases"


def apply_edits(def_text, model_state, optim_state, net, unshare, conv_to_local):
    """(def_text, model_state, optim_state, console lines) after unsharing, then converting.

    Unsharing runs first, so a shared conv can be unshared and converted in one run."""
    model_state, optim_state = dict(model_state), copy.deepcopy(optim_state)
    lines = []
    for entry in unshare:
        name, indices = _parse_unshare(entry, net)
        def_text = _set_weight_sources(def_text, name, [
            None if i in indices else source
            for i, source in enumerate(net.layers[name].weight_sources)])
        for i in indices:
            optim_state = _unshare_increment(optim_state, net, name, i)
            lines.append(f"Unshared weight matrix {i} of layer '{name}'")
    for name in conv_to_local:
        def_text, model_state, optim_state = _conv_to_local(def_text, model_state, optim_state,
                                                            net, name, unshare)
        lines.append(f"Converted layer '{name}' from conv to local")
    return def_text, model_state, optim_state, lines


# -- unshare ------------------------------------------------------------------------------------
def _parse_unshare(entry, net):
    """'layer' -> every shared matrix of it; 'layer[idx]' -> that one, which must be shared."""
    name, bracket, idx = entry.strip().partition("[")
    layer = net.layers[name] if name in net.layers else None
    sources = getattr(layer, "weight_sources", None)
    if sources is None:
        raise OptionError(f"--unshare-weights {entry}: '{name}' is not a weight layer of this net")
    shared = [i for i, source in enumerate(sources) if source is not None]
    if not bracket:
        if not shared:
            raise OptionError(f"--unshare-weights {entry}: layer '{name}' shares no weights")
        return name, shared
    try:
        index = int(idx.rstrip("]"))
    except ValueError:
        raise OptionError(f"--unshare-weights {entry}: expected layer or layer[idx]") from None
    if index not in shared:
        raise OptionError(f"--unshare-weights {entry}: matrix {index} of '{name}' is not shared "
                          f"(shared: {shared or 'none'})")
    return name, [index]


def _unshare_increment(optim_state, net, name, index):
    """Give the newly owned matrix an optimizer group, placed where Ccn2SGD's own order puts it
    (a layer's weights by index, then its biases); its momentum starts as a copy of the shared
    matrix's, so the first update continues the one the shared matrix would have had."""
    groups, state = optim_state["param_groups"], optim_state["state"]
    owner, owner_index = weight_owner(net.layers, name, index)
    source = next(g for g in groups
                  if (g["layer"], tuple(g["kind"])) == (owner, (WEIGHTS, owner_index)))
    at = next(k for k, g in enumerate(groups) if g["layer"] == name and
              (tuple(g["kind"]) == (BIASES,) or g["kind"][1] > index))
    entries = [(g, state[g["params"][0]]) for g in groups]
    new_group = dict(source, layer=name, kind=(WEIGHTS, index))
    entries.insert(at, (new_group, copy.deepcopy(state[source["params"][0]])))
    return _renumbered(optim_state, entries)


def _renumbered(optim_state, entries):
    """An optimizer state dict whose groups own params 0, 1, ... in order."""
    groups = [dict(group, params=[k]) for k, (group, _) in enumerate(entries)]
    return dict(optim_state, param_groups=groups,
                state={k: entry for k, (_, entry) in enumerate(entries)})


# -- conv to local -------------------------------------------------------------------------------
def _conv_to_local(def_text, model_state, optim_state, net, name, unshared):
    layer = net.layers[name] if name in net.layers else None
    if layer is None or layer.type_name != "conv":
        convs = ", ".join(n for n, other in net.layers.items() if other.type_name == "conv")
        raise OptionError(f"--conv-to-local {name}: '{name}' is not a conv layer of this net "
                          f"(conv layers: {convs or 'none'})")
    still_shared = any(s is not None for s in layer.weight_sources) and name not in unshared
    users = [other.name for other in net.weight_layers() if other is not layer and
             any(s is not None and s[0] == name for s in other.weight_sources)]
    if still_shared or users:
        raise OptionError(f"--conv-to-local {name}: its weights are shared (weightSource); "
                          f"unshare them first with --unshare-weights")
    modules = layer.modules_x * layer.modules_x
    model_state = dict(model_state)
    for i, w in enumerate(layer.windows):
        key = f"layers.{name}.weights.{i}"
        model_state[key] = _tiled_filters(model_state[key], w.groups, modules)
    bias_key = f"layers.{name}.biases"
    model_state[bias_key] = model_state[bias_key].reshape(layer.filters, -1).expand(
        layer.filters, modules).reshape(layer.filters, layer.modules_x, layer.modules_x).clone()
    optim_state = _zero_increments(optim_state, name, model_state)
    return _as_local_section(def_text, name), model_state, optim_state


def _tiled_filters(conv_weight, groups, modules):
    """conv (F, Cf, k, k) -> local (M², groups, Cf·k², F/groups), the same filter everywhere;
    both order a filter's rows channel·k² + y·k + x (layers/conv.py)."""
    filters = conv_weight.shape[0]
    per_group = conv_weight.reshape(groups, filters // groups, -1).permute(0, 2, 1)
    return per_group.unsqueeze(0).expand(modules, *per_group.shape).contiguous()


def _zero_increments(optim_state, name, model_state):
    """The converted layer's momentum restarts from zero, as the original's conv-to-local did:
    a conv filter's increment sums all positions, which no one local filter had."""
    groups, state = optim_state["param_groups"], dict(optim_state["state"])
    for group in groups:
        if group["layer"] != name:
            continue
        kind = tuple(group["kind"])
        key = f"layers.{name}.biases" if kind == (BIASES,) else f"layers.{name}.weights.{kind[1]}"
        index = group["params"][0]
        state[index] = dict(state[index], inc=torch.zeros_like(model_state[key]))
    return dict(optim_state, state=state)


# -- the layer-definition text ------------------------------------------------------------------
_KEY_LINE = r"^\s*{key}\s*[=:]"


def _section_span(def_text, name):
    """(first line, end line) of `[name]` in the text's lines, header included."""
    lines = def_text.splitlines(keepends=True)
    start = next(k for k, line in enumerate(lines) if line.strip() == f"[{name}]")
    end = next((k for k in range(start + 1, len(lines)) if lines[k].lstrip().startswith("[")),
               len(lines))
    return lines, start, end


def _edit_section(def_text, name, drop, set_values):
    """The text with `[name]`'s `drop` keys removed (continuation lines too) and `set_values`
    replacing those keys' values; case-insensitive keys, as the cfg reader reads them."""
    lines, start, end = _section_span(def_text, name)
    body, skipping = [], False
    for line in lines[start + 1:end]:
        if skipping and line[:1] in (" ", "\t") and line.strip():
            continue
        skipping = any(re.match(_KEY_LINE.format(key=k), line, re.I) for k in drop)
        if skipping:
            continue
        for key, value in set_values.items():
            if re.match(_KEY_LINE.format(key=key), line, re.I):
                line = f"{key}={value}\n"
        body.append(line)
    return "".join(lines[:start + 1] + body + lines[end:])


def _set_weight_sources(def_text, name, sources):
    if all(s is None for s in sources):
        return _edit_section(def_text, name, ["weightSource"], {})
    value = ",".join("" if s is None else f"{s[0]}[{s[1]}]" for s in sources)
    return _edit_section(def_text, name, [], {"weightSource": value})


def _as_local_section(def_text, name):
    """conv -> local: local layers have neither sumWidth nor shared biases."""
    return _edit_section(def_text, name, ["sumWidth", "sharedBiases"], {"type": "local"})
