"""Fixtures of the multi-process tests: the demo digits, and the one-process run that every
launcher's run must reproduce."""

import pytest

from dp_helpers import build_demo_data, newest_checkpoint, run_ok, single, tiny_args


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo-cifar"))


@pytest.fixture(scope="session")
def one_process_on(demo_data, tmp_path_factory):
    """device -> (stdout, checkpoint, save path) of the tiny net trained by one process on that
    device ("cpu" or "cuda"), trained when first asked for: a skipped test trains nothing."""
    runs = {}

    def trained_on(device):
        if device not in runs:
            save = tmp_path_factory.mktemp(f"one-process-{device}")
            out, _ = run_ok(single(tiny_args(demo_data, save, device=device)))
            runs[device] = out, newest_checkpoint(save), save
        return runs[device]
    return trained_on


@pytest.fixture(scope="session")
def one_process(one_process_on):
    return one_process_on("cpu")
