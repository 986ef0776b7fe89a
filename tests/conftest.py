"""Shared fixtures and markers: GPU/DALI/NCCL/MPI tests skip themselves where they cannot run."""

import importlib.util
import shutil

import pytest
import torch


def _has(module):
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    reasons = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
        "nccl": None if torch.cuda.device_count() >= 2 else "needs two CUDA GPUs",
        "dali": None if _has("nvidia.dali") else "needs NVIDIA DALI",
        "mpi": None if _has("mpi4py") and shutil.which("mpirun") else "needs mpi4py and mpirun",
    }
    for item in items:
        for mark, reason in reasons.items():
            if reason and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
