"""cuda-convnet2's weight update (spec §5.2, §8 "Weight updates") as a torch.optim.Optimizer.

For each weight matrix W, with ε = epsW(progress), μ = momW, λ = wc:

    g   = −(Σ_cases ∂E/∂W) / Nnom
    inc = μ·inc + ε·g − λ·ε·W
    W   = W + inc

and the same for the bias vector with epsB and momB but no decay. E is the *sum* over cases of
coeff × cost, so `p.grad` already holds Σ_cases ∂E/∂W; the division by the nominal case count
Nnom happens here.

Contract with the trainer:
  * `set_progress(p)` once per data batch (spec §2: the schedules advance per data batch).
  * `step()` once per minibatch pass, after backward. A group with effective update period k
    lets `.grad` accumulate over k calls, then updates and clears its own gradients. The
    optimizer owns zeroing: the trainer must NOT call `zero_grad()` per minibatch, or periods
    above 1 (updatePeriod, hybrid nets' activePassPeriod) would update on one pass's gradient.
  * Build it after the model is on its device: the increments live next to their parameters.

One param group per weight matrix and one per bias vector, so every matrix carries its own
hyper-parameters.

weightSource: a receiving layer holds a copy of its source's matrix (model.py), with a gradient
of its own. The group is the owner's: only the owner's μ, λ, wball, wcNorm and update period
act (spec §4.5), and after each update the owner's values are copied into its receivers. Each
layer that uses the matrix adds its own gradient, divided by its own Nnom, into the owner's inc,
as WeightLayer::bpropCommon/getGradScale did, at the rate cuda-convnet2 gave it:
  * fc, sfc and local layers with one replica (the original's useGrad=false weights): each use
    at its own layer's ε, inc = μ·inc + Σ_uses ε_use·g_use − λ·ε·W;
  * conv layers and layers with several replicas (useGrad=true): every use at the owner's ε;
and a use whose own epsW base is 0 adds nothing (its layer computed no weight gradient).

Speed: a step groups the due matrices by equal (μ, ε/Nnom, λ·ε) and updates each bucket with
torch._foreach_* ops, a few kernel launches per bucket, and never reads a value back to the host.
With `fused` (CUDA and torch.compile), a step in which every learned matrix is due, has a
gradient and no weightSource receiver runs one compiled kernel per matrix instead, which reads
W, inc and the gradient once and writes W and inc once: the foreach ops' eleven passes over the
weights took a fifth of an imagenet-1gpu step at --mini 128 (BENCHMARKS.md, 2026-12-04). Its
(μ, −ε/Nnom, −λ·ε) live in a device tensor rewritten when the schedules move, so a new rate
costs no recompilation.
"""

from collections import defaultdict

import torch

from .constraints import COLUMNS, constrain
from .errors import CheckpointError, ConfigError, OptionError
from .layers.base import weight_owner
from .optim_fused import FusedUpdate
from .schedule import SCHEDULES

WEIGHTS, BIASES = "weights", "biases"


def _schedule_from_dict(d):
    return SCHEDULES[d["type"]](**d["params"])


class Ccn2SGD(torch.optim.Optimizer):
    """cuda-convnet2's momentum SGD over a net's weight layers (see the module docstring).

    weight_layers: WeightLayer-like objects in file order, each with `.name`, `.type_name`,
      `.weights` (one Parameter per input), `.biases`, `.weight_sources`, `.learning`.
    minibatch: --mini. num_passes: passes per minibatch (spec §8; 1 without hybrid layers).
    active_pass_period: {layer name: activePassPeriod} from the parallel plan (default 1).

    Each param group holds one tensor and plain values only (so state_dict() loads with
    weights_only=True): layer, kind ("weights", i) | ("biases",), layer_type, schedule (its
    to_dict()), base_lr, lr (ε now), momentum, wc (0 for biases), wball, wc_norm_max/min,
    update_period (effective), nominal_cases (Nnom), owner_rate (whether the receivers' gradients
    take the owner's ε) and receivers: per receiving matrix, its layer, kind, schedule, base_lr,
    lr and nominal_cases. The receivers' tensors are kept apart (`receivers()`).
    """

    def __init__(self, weight_layers, minibatch, num_passes=1, active_pass_period=None,
                 fused=False):
        if minibatch < 1 or num_passes < 1:
            raise OptionError(f"minibatch size ({minibatch}) and passes per minibatch "
                              f"({num_passes}) must be at least 1")
        self.minibatch, self.num_passes = minibatch, num_passes
        self.active_pass_period = dict(active_pass_period or {})
        self.progress = 0.0
        groups, self._layers, shared = self._groups_for(weight_layers)
        self._share(shared)
        super().__init__(groups, {})
        for group in self.param_groups:
            p = group["params"][0]
            self.state[p] = {"inc": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "pending": 0}
        self._fused = FusedUpdate() if fused else None
        self.last_step_fused = False
        self.set_progress(0.0)

    # -- building groups from the layers' hyper-parameters -----------------------------------
    def _groups_for(self, weight_layers):
        """(param groups, [(layer, [id of each input's owned matrix], id of biases)],
        [(owned matrix, a receiver's copy of it)])."""
        by_name = {layer.name: layer for layer in weight_layers}
        groups, layers, shared, group_of = [], [], [], {}
        for layer in weight_layers:
            learning = layer.learning
            period = self._effective_period(layer)
            weight_cases = period * (self.minibatch / self.num_passes)
            owned = []
            for i, w in enumerate(layer.weights):
                if layer.weight_sources[i] is None:
                    group = group_of[(layer.name, i)] = self._group(
                        layer, (WEIGHTS, i), w, learning.eps_w[i], learning.mom_w[i],
                        learning.wc[i], learning.wball[i], learning.wc_norm_max[i],
                        learning.wc_norm_min[i], period, weight_cases)
                    groups.append(group)
                else:
                    group = group_of[weight_owner(by_name, layer.name, i)]
                    group["receivers"].append(
                        {"layer": layer.name, "kind": (WEIGHTS, i),
                         "schedule": learning.eps_w[i].to_dict(),
                         "base_lr": float(learning.eps_w[i].params.get("base", 0.0)),
                         "lr": 0.0, "nominal_cases": float(weight_cases)})
                    shared.append((group["params"][0], w))
                owned.append(id(group["params"][0]))
            # Biases are scaled by period·ceil(mini/passes), not mini/passes as the weights are
            # (WeightLayer::getBGradScale vs getGradScale); equal unless passes ∤ mini.
            groups.append(self._group(
                layer, (BIASES,), layer.biases, learning.eps_b, learning.mom_b, 0.0, 0.0, 0.0,
                0.0, period, period * -(-self.minibatch // self.num_passes)))
            layers.append((layer.name, owned, id(layer.biases)))
        return groups, layers, shared

    def _share(self, shared):
        self._receivers, self._owner_of = {}, {}
        for owner, receiver in shared:
            self._receivers.setdefault(id(owner), []).append(receiver)
            self._owner_of[id(receiver)] = owner

    def _effective_period(self, layer):
        """spec §8: updatePeriod_eff = max(updatePeriod, activePassPeriod); 0 = every pass."""
        active = self.active_pass_period.get(layer.name, 1)
        period = max(layer.learning.update_period, active)
        if period % active:
            raise ConfigError(f"updatePeriod={layer.learning.update_period} must be a multiple "
                              f"of the layer's active pass period {active}", layer=layer.name)
        return period

    @staticmethod
    def _group(layer, kind, param, schedule, momentum, wc, wball, norm_max, norm_min, period,
               nominal_cases):
        needs_columns = wball > 0 or norm_max > 0
        if needs_columns and layer.type_name not in COLUMNS:
            raise ConfigError(f"wball/wcNormMax are not supported on a {layer.type_name} layer",
                              layer=layer.name)
        return {"params": [param], "layer": layer.name, "kind": kind,
                "layer_type": layer.type_name, "schedule": schedule.to_dict(),
                "base_lr": float(schedule.params.get("base", 0.0)), "lr": 0.0,
                "momentum": float(momentum), "wc": float(wc), "wball": float(wball),
                "wc_norm_max": float(norm_max), "wc_norm_min": float(norm_min),
                "update_period": period, "nominal_cases": float(nominal_cases),
                # The original's useGrad weights: conv, and any layer with several replicas.
                "owner_rate": layer.type_name == "conv" or len(layer.gpus) > 1,
                "receivers": []}

    # -- the per-batch and per-pass calls ----------------------------------------------------
    def set_progress(self, progress):
        """Evaluate every schedule at this data batch's progress (spec §2, §5.1)."""
        self.progress = progress
        for group in self.param_groups:
            group["lr"] = float(_schedule_from_dict(group["schedule"])(progress))
            for use in group["receivers"]:
                use["lr"] = float(_schedule_from_dict(use["schedule"])(progress))
        if self._fused is not None:
            self._fused.rates_changed()

    @torch.no_grad()
    def step(self, closure=None):
        """One minibatch pass: update the groups whose update period is complete."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        due = []
        for group in self.param_groups:
            state = self.state[group["params"][0]]
            state["pending"] += 1
            if state["pending"] >= group["update_period"]:
                state["pending"] = 0
                due.append(group)
        self.last_step_fused = self._fused is not None and self._fused.apply(
            due, self.param_groups, self.state)
        if not self.last_step_fused:
            self._apply(due)
        owners, copies = [], []
        for group in due:
            p = group["params"][0]
            if group["base_lr"] > 0:
                constrain(group)
            p.grad = None
            for receiver in self._receivers.get(id(p), ()):
                owners.append(p)
                copies.append(receiver)
                receiver.grad = None
        if copies:
            torch._foreach_copy_(copies, owners)
        return loss

    @property
    def fused(self):
        """Whether step() may update through the compiled fused form (see the module doc)."""
        return self._fused is not None

    def updates_every_step(self):
        """Whether every matrix is updated at every step() (no update period above 1)."""
        return all(group["update_period"] <= 1 for group in self.param_groups)

    def refresh_rates(self):
        """Bring the fused update's device copy of the rates up to date (a recorded CUDA graph
        reads them there; step() does this itself)."""
        if self._fused is not None:
            self._fused.refresh(self.param_groups)

    def _apply(self, due):
        # A matrix whose base rate is 0 is not learned at all, not even decayed (spec §5.1;
        # Weights::update returns early).
        buckets = defaultdict(lambda: ([], [], [], []))
        received = defaultdict(lambda: ([], []))    # receivers' gradients, by their scale
        for group in due:
            if group["base_lr"] <= 0:
                continue
            p = group["params"][0]
            eps = group["lr"]
            key = (p.device, p.dtype, group["momentum"], -eps / group["nominal_cases"],
                   -eps * group["wc"])
            params, incs, graded_incs, grads = buckets[key]
            inc = self.state[p]["inc"]
            params.append(p)
            incs.append(inc)
            # No gradient (no backward reached it) counts as a zero gradient, as in the
            # original with a 0-case pass: momentum and decay still apply.
            if p.grad is not None:
                graded_incs.append(inc)
                grads.append(p.grad)
            for use, receiver in zip(group["receivers"], self._receivers.get(id(p), ())):
                if use["base_lr"] > 0 and receiver.grad is not None:
                    rate = eps if group["owner_rate"] else use["lr"]
                    receiving_incs, receiver_grads = received[
                        (p.device, p.dtype, -rate / use["nominal_cases"])]
                    receiving_incs.append(inc)
                    receiver_grads.append(receiver.grad)
        for (_, _, momentum, grad_scale, decay), (params, incs, graded_incs, grads) in \
                buckets.items():
            torch._foreach_mul_(incs, momentum)
            if grads:
                torch._foreach_add_(graded_incs, grads, alpha=grad_scale)
            if decay:
                torch._foreach_add_(incs, params, alpha=decay)
        for (_, _, grad_scale), (incs, grads) in received.items():
            torch._foreach_add_(incs, grads, alpha=grad_scale)
        for params, incs, _, _ in buckets.values():
            torch._foreach_add_(params, incs)

    def zero_grad(self, set_to_none=True):
        """Drop every accumulated gradient and restart every update period.

        Not part of the per-minibatch cycle (step() clears what it applied); for discarding
        gradients that must not be learned from, e.g. after a gradient check.
        """
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            self.state[group["params"][0]]["pending"] = 0
        for receivers in self._receivers.values():
            for receiver in receivers:
                receiver.grad = None

    # -- resume --------------------------------------------------------------------------------
    def refresh(self, weight_layers):
        """Re-read the hyper-parameters after the layer-params file was re-read; keeps inc."""
        groups, layers, shared = self._groups_for(weight_layers)
        if [id(g["params"][0]) for g in groups] != \
                [id(g["params"][0]) for g in self.param_groups]:
            raise CheckpointError("refresh() was given a net whose weight matrices are not the "
                                  "ones this optimizer was built for")
        for old, new in zip(self.param_groups, groups):
            old.update(new)
        self._layers = layers
        self._share(shared)
        if self._fused is not None:
            self._fused = FusedUpdate()        # which matrices are learned may have changed
        self.set_progress(self.progress)

    def load_state_dict(self, state_dict):
        """Restore the increments and pending pass counts; keep the current hyper-parameters.

        On resume the layer-params file is re-read and wins over the checkpoint (spec §5), so
        only the optimizer *state* comes from `state_dict`.
        """
        saved = state_dict["param_groups"]
        mine = [(g["layer"], tuple(g["kind"])) for g in self.param_groups]
        theirs = [(g["layer"], tuple(g["kind"])) for g in saved]
        if mine != theirs:
            missing = sorted(set(mine) ^ set(theirs))
            raise CheckpointError(f"the checkpoint's weight matrices do not match this net's "
                                  f"(differing: {missing[:5] or 'order'})")
        index_of = {}
        for saved_group, group in zip(saved, self.param_groups):
            index_of[saved_group["params"][0]] = group["params"][0]
        for index, entry in state_dict["state"].items():
            p = index_of[index]
            if tuple(entry["inc"].shape) != tuple(p.shape):
                raise CheckpointError(f"the checkpoint's increment for a matrix of shape "
                                      f"{tuple(p.shape)} has shape {tuple(entry['inc'].shape)}")
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict({
            "state": state_dict["state"],
            "param_groups": [dict(c, params=s["params"]) for c, s in zip(current, saved)]})

    # -- what the console, metrics, checkpoint and pass schedule need ---------------------------
    def matrices(self, due_next_step=False):
        """(layer, owned matrix, [its weightSource receivers' copies]) of every matrix, in
        group order; with `due_next_step`, only those the next step() updates."""
        for group in self.param_groups:
            param = group["params"][0]
            if not due_next_step or self.state[param]["pending"] + 1 >= group["update_period"]:
                yield group["layer"], param, self.receivers(param)

    def freeze(self, layers):
        """Leave the matrices of `layers` unchanged: a group whose base rate is 0 is neither
        learned nor decayed (spec §5.1). Holds until refresh() re-reads the rates."""
        layers = set(layers)
        for group in self.param_groups:
            if group["layer"] in layers:
                group["base_lr"] = 0.0

    def receivers(self, param):
        """The copies of an owned matrix that layers receiving it through weightSource hold."""
        return list(self._receivers.get(id(param), ()))

    def increment(self, param):
        """The momentum buffer ("inc", the checkpoint's weightsInc/biasesInc) of a parameter;
        a receiver's is its owner's."""
        param = self._owner_of.get(id(param), param)
        return self.state[param]["inc"] if param in self.state else None

    def increments(self):
        """{layer: {"weights": [inc per input], "biases": inc}}; a shared matrix appears under
        both its layers, as the same tensor."""
        by_id = {id(g["params"][0]): g["params"][0] for g in self.param_groups}
        return {name: {WEIGHTS: [self.state[by_id[w]]["inc"] for w in weights],
                       BIASES: self.state[by_id[b]]["inc"]}
                for name, weights, b in self._layers}

    def current_rates(self):
        """{layer: {"epsW": [ε per input], "epsB": ε}} at the current progress: the rate applied
        to each layer's own gradient (a receiver's is the owner's where `owner_rate`)."""
        rates = {}
        for g in self.param_groups:
            rates[(g["layer"], tuple(g["kind"]))] = g["lr"]
            for use in g["receivers"]:
                rates[(use["layer"], tuple(use["kind"]))] = g["lr"] if g["owner_rate"] \
                    else use["lr"]
        return {name: {"epsW": [rates[(name, (WEIGHTS, i))] for i in range(len(weights))],
                       "epsB": rates[(name, (BIASES,))]}
                for name, weights, _ in self._layers}


def weight_stats(weight_layers, optimizer):
    """Rows (layer, "weights[i]" | "biases", mean|W|, mean|inc|) of the test block (spec §9.2).

    One host read for the whole table (per device), at a test event only.
    """
    rows, values = [], []
    for layer in weight_layers:
        named = [(f"weights[{i}]", w) for i, w in enumerate(layer.weights)]
        for label, p in named + [("biases", layer.biases)]:
            inc = optimizer.increment(p)
            rows.append((layer.name, label))
            values.append(p.detach().abs().mean())
            values.append(inc.abs().mean() if inc is not None
                          else torch.zeros((), device=p.device))
    by_device = defaultdict(list)
    for k, v in enumerate(values):
        by_device[v.device].append(k)
    numbers = [0.0] * len(values)
    for indices in by_device.values():
        read = torch.stack([values[k].double() for k in indices]).tolist()
        for k, x in zip(indices, read):
            numbers[k] = x
    return [(name, label, numbers[2 * k], numbers[2 * k + 1])
            for k, (name, label) in enumerate(rows)]
