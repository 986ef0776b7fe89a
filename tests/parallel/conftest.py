"""Fixtures of the multi-process tests: the demo digits, and the one-process run that every
launcher's run must reproduce."""

import pytest

from dp_helpers import build_demo_data, newest_checkpoint, run_ok, single, tiny_args


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo-cifar"))


@pytest.fixture(scope="session")
def one_process(demo_data, tmp_path_factory):
    """(stdout, checkpoint, save path) of the tiny net trained by one process."""
    save = tmp_path_factory.mktemp("one-process")
    out, _ = run_ok(single(tiny_args(demo_data, save)))
    return out, newest_checkpoint(save), save
