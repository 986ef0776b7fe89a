"""`--check-grads 1` (spec §9.4): every weight matrix's and bias vector's analytic gradient
against a one-sided finite difference, on the first minibatch of the first data batch.

The check runs on a float64 copy of the net: in float32, (cost(w+ε) − cost(w)) loses most of
its digits to rounding, so the original's ε and 0.02 threshold would test rounding as much as
the backward pass. Layers run in eval mode, so dropout is off and both sides see the same net.
"""

import os
import time
from typing import NamedTuple

import torch

from .layers import BuildContext
from .model import ConvNet
from .parallel import launch
from .providers import ProviderOptions, make_provider

# ε per layer type, (weights, biases): the original's values (spec §9.4); other weight layers
# (fc and its kin) use the fc pair.
EPSILONS = {"conv": (0.02, 0.005), "local": (0.02, 0.005)}
FC_EPSILONS = (0.01, 0.01)
MAX_RELATIVE_ERROR = 0.02
KINKED_NEURONS = ("relu", "brelu", "abs")
MAX_POOLS = ("max", "maxabs")


class MatrixCheck(NamedTuple):
    layer: str
    what: str                # "weights[i]" or "biases"
    numeric_norm: float
    analytic_norm: float
    relative_error: float
    elements: int
    seconds: float

    @property
    def passed(self):
        return self.relative_error < MAX_RELATIVE_ERROR

    def lines(self):
        verdict = "PASS" if self.passed else "****FAIL****"
        return [f"{verdict} {self.layer} {self.what} GRADIENT CHECK",
                f"    numeric norm: {self.numeric_norm:e}  analytic norm: "
                f"{self.analytic_norm:e}  relative error: {self.relative_error:e}",
                f"    {self.elements:,} elements, {self.seconds:.3f} sec"]


def prepare_from_options(opts, state=None):
    """(model, minibatch) for a parsed command line (and the checkpoint it resumes, if any).
    As in the original, --check-grads ignores the data path, the save path and the batch
    ranges: the provider (normally dummy-lr-<n>) is asked for batch 0."""
    device = launch.pick_device(opts.device, opts.gpu, launch.launch_info())
    torch.manual_seed(opts.seed or 0)        # the same initial weights, so the same verdict
    provider = make_provider(opts.dp_type, "", [0], test=True,
                             options=ProviderOptions(seed=opts.seed or 0, device=device,
                                                     minibatch=opts.minibatch_size))
    def_path = os.path.join(opts.layer_path, opts.layer_def)
    params_path = os.path.join(opts.layer_path, opts.layer_params)
    ctx = BuildContext(provider.get_data_dims, provider.get_num_classes())
    if state is None:
        model = ConvNet(def_path, params_path, ctx)
    else:
        model = ConvNet.from_checkpoint(state["path"], state["layer_def"], ctx, params_path)
        model.load_state_dict(state["model"])
    batch = provider.get_next_batch()
    return model.to(device), [m[:opts.minibatch_size] for m in batch.mats]


def checked_parameters(model):
    """(layer, "weights[i]" or "biases", parameter, ε) for every weight matrix and bias vector of
    each layer, in layer order. A layer's copy of a matrix shared through weightSource is
    checked with the layer: the gradient it holds is that layer's own (model.py)."""
    found = []
    for layer in model.weight_layers():
        eps_w, eps_b = EPSILONS.get(layer.type_name, FC_EPSILONS)
        named = [(f"weights[{i}]", w, eps_w) for i, w in enumerate(layer.weights)]
        for what, param, eps in named + [("biases", layer.biases, eps_b)]:
            found.append((layer.name, what, param, eps))
    return found


def kinks(model):
    """The layers whose output is not smooth in their input: ReLU-like neurons and max
    pooling. A finite step across a kink, or one that changes a window's maximum, measures
    neither side's slope, so the original's coarse ε fails such nets although their
    gradients are right."""
    found = []
    for name, layer in model.layers.items():
        if layer.type_name == "neuron" and layer.neuron_type.name in KINKED_NEURONS:
            found.append(f"{name} ({layer.neuron_type.name})")
        elif (layer.type_name == "pool" and layer.pool in MAX_POOLS
              or layer.type_name in ("cmpool", "eltmax")):
            found.append(f"{name} (max)")
    return found


def intro_lines(model, mats):
    """What the check will do, printed before it starts: it can take minutes."""
    params = checked_parameters(model)
    elements = sum(param.numel() for _, _, param, _ in params)
    lines = [f"Checking {len(params)} weight matrices and bias vectors: {elements:,} elements, "
             f"one forward pass of {mats[0].shape[0]} cases each"]
    kinked = kinks(model)
    if kinked:
        lines.append(f"warning: {', '.join(kinked)} are not smooth: matrices whose gradients "
                     f"are right may fail the check (it is meant for nets of smooth neurons, "
                     f"such as tanh or logistic, and avg pooling)")
    return lines


def check_gradients(model, mats):
    """One MatrixCheck per weight matrix and bias vector of each layer, in layer order, each
    yielded as soon as it is computed."""
    model = model.double().eval()
    mats = [m.double() for m in mats]
    num_cases = mats[0].shape[0]
    model.zero_grad(set_to_none=True)
    model(mats).objective.backward()
    for layer, what, param, eps in checked_parameters(model):
        started = time.perf_counter()
        analytic = _analytic(param) / num_cases
        numeric = _numeric(model, mats, param, eps) / num_cases
        yield _compare(layer, what, numeric, analytic, time.perf_counter() - started)
    model.zero_grad(set_to_none=True)


def _analytic(param):
    # A parameter that the cost does not reach has no gradient: zero, as in the original.
    return torch.zeros_like(param) if param.grad is None else param.grad.detach()


@torch.no_grad()
def _numeric(model, mats, param, eps):
    """(cost(w + ε e_i) − cost(w)) / ε for every element i, one forward pass per element."""
    base = model(mats).objective
    flat = param.view(-1)
    slopes = torch.empty_like(flat)
    for i in range(flat.numel()):
        saved = flat[i].clone()
        flat[i] += eps
        slopes[i] = (model(mats).objective - base) / eps
        flat[i] = saved
    return slopes.view_as(param)


def _compare(layer, what, numeric, analytic, seconds):
    numeric_norm = float(numeric.norm())
    analytic_norm = float(analytic.norm())
    difference = float((numeric - analytic).norm())
    # An all-zero analytic gradient passes only if the numeric one is zero too.
    relative = difference / analytic_norm if analytic_norm > 0 else \
        (0.0 if difference == 0 else float("inf"))
    return MatrixCheck(layer, what, numeric_norm, analytic_norm, relative, numeric.numel(),
                       seconds)


def summary_line(results):
    failed = sum(not r.passed for r in results)
    if failed == 0:
        return f"ALL {len(results)} TESTS PASSED"
    return f"{failed}/{len(results)} TESTS FAILED"
