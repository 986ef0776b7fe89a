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


# -- the trainer's end-to-end tests (helpers in trainer_fixtures.py) ---------------------------

@pytest.fixture(scope="session")
def digit_cifar(tmp_path_factory):
    """A CIFAR-format set of real digit images, 10x10, six batches of 64 (written once)."""
    from trainer_fixtures import write_digit_cifar
    return write_digit_cifar(tmp_path_factory.mktemp("digit-cifar"))


@pytest.fixture(scope="session")
def tiny_run(digit_cifar, tmp_path_factory):
    """One finished training run of layers-tiny.cfg, shared by the tests that only read it."""
    from trainer_fixtures import TinyRun
    return TinyRun.train(digit_cifar, tmp_path_factory.mktemp("tiny-run"))
