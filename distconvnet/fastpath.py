"""How a net runs fast on a device: placement, memory format, precision and compilation.

One place for these choices, shared by the trainer and the benchmark, so that what is measured
is what users get. On CUDA: channels_last weights, bf16 autocast and torch.compile by default;
`--precision fp32` keeps the float32 reference path. The process-wide switches that go with
these (cuDNN autotuning, TF32, the trainer's stream) are set in knobs.py.
"""

import contextlib

import torch


def resolve_precision(precision, device):
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_compile(setting, device):
    if setting in ("auto", None):
        return device.type == "cuda"
    return bool(int(setting))


def fused_update(setting, device):
    """Whether the optimizer compiles its update (optim.py): on CUDA whenever the net is
    compiled; the CPU keeps the eager foreach update, which is as fast there."""
    return device.type == "cuda" and resolve_compile(setting, device)


def place(model, device):
    """Move the net; on CUDA use channels_last (what cuDNN's fast conv kernels want)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device, precision):
    """A context for the forward pass: bf16 autocast, or nothing for the fp32 path (whose TF32
    switches knobs.for_run turns off)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def forward_fn(model, compile_model):
    """The callable the trainer runs forward through: the module itself or its compiled form."""
    if not compile_model:
        return model
    return torch.compile(model, dynamic=False)


def eager_step(forward, optimizer, autocast):
    """One minibatch's forward, backward and update; returns its costs (device tensors)."""
    def step(mats):
        with autocast():
            out = forward(mats)
        out.objective.backward()
        optimizer.step()
        return {name: values.detach().float() for name, values in out.costs.items()}
    return step


class GraphedStep:
    """The same step, recorded as one CUDA graph per minibatch shape and replayed: launching the
    ~150 kernels of an imagenet-1gpu step one by one from Python took twice the GPU's time at
    --mini 128 while DALI decoded beside it (BENCHMARKS.md, 2026-12-04); a replay is one launch.

    A shape runs eagerly `WARMUP` times (compilation, cuDNN autotuning), is captured on its
    next minibatch and replayed from then on. Only a step the optimizer updates entirely through
    its fused form is kept: that form reads the learning rates from a device tensor, where a
    recorded foreach update would keep the rates of the moment it was recorded. A shape whose
    capture fails stays eager, and take_warnings() says why.
    """

    WARMUP = 2

    def __init__(self, forward, optimizer, autocast):
        self._eager = eager_step(forward, optimizer, autocast)
        self._optimizer = optimizer
        self._graphs, self._seen, self._pool = {}, {}, None
        self._warnings = []

    def __call__(self, mats):
        key = tuple((tuple(m.shape), m.dtype, m.device) for m in mats)
        self._optimizer.refresh_rates()
        graph = self._graphs.get(key)
        if graph is not None:
            return graph.replay(mats)
        self._seen[key] = self._seen.get(key, 0) + 1
        if key in self._graphs or self._seen[key] <= self.WARMUP:
            return self._eager(mats)
        self._graphs[key] = graph = self._capture(mats)
        return self._eager(mats) if graph is None else graph.replay(mats)

    def _capture(self, mats):
        graph = _Recording([m.clone() for m in mats])
        try:
            with torch.cuda.graph(graph.graph, pool=self._pool):
                graph.costs = self._eager(graph.inputs)
            if not self._optimizer.last_step_fused:
                raise RuntimeError("the update was not the fused one")
        except Exception as e:    # whatever the capture refuses, the shape trains eagerly
            self._optimizer.zero_grad()    # gradients the capture left are not real ones
            self._warnings.append(f"minibatches of shape {tuple(mats[0].shape)} train without a "
                                  f"CUDA graph: its capture failed ({' '.join(str(e).split())})")
            return None
        self._pool = graph.graph.pool()
        return graph

    def take_warnings(self):
        lines, self._warnings = self._warnings, []
        return lines


class _Recording:
    def __init__(self, inputs):
        self.graph, self.inputs, self.costs = torch.cuda.CUDAGraph(), inputs, {}

    def replay(self, mats):
        for static, m in zip(self.inputs, mats):
            static.copy_(m)
        self.graph.replay()
        return {name: values.clone() for name, values in self.costs.items()}


def train_step(forward, optimizer, autocast, graphs):
    """The trainer's step: graphed (CUDA, compiled, one process, fused update) or eager."""
    if graphs:
        return GraphedStep(forward, optimizer, autocast)
    return eager_step(forward, optimizer, autocast)
