"""How a net runs fast on a device: placement, memory format, precision and compilation.

One place for these choices, shared by the trainer and the benchmark, so that what is measured
is what users get. On CUDA: channels_last weights, cuDNN autotuning, bf16 autocast and
torch.compile by default; `--precision fp32` keeps the float32 reference path (TF32 off).
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


def place(model, device, autotune=True):
    """Move the net; on CUDA use channels_last (what cuDNN's fast conv kernels want) and, unless
    `autotune` is off (--deterministic 1), let cuDNN time its kernels and keep the fastest."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = autotune
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device, precision):
    """A context for the forward pass: bf16 autocast, or nothing for the fp32 path."""
    if precision == "fp32":
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def forward_fn(model, compile_model):
    """The callable the trainer runs forward through: the module itself or its compiled form."""
    if not compile_model:
        return model
    return torch.compile(model, dynamic=False)
