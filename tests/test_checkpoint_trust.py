"""A checkpoint is data: whatever its stored cfg text or histories say, loading it through any
entry point (resume, --test-only, --write-features, shownet) imports nothing, runs nothing and
writes nothing at a path of its choosing; where it cannot be used, one error line says so.

The checkpoints here are a real run's, edited the way an attacker would: the raw torch file is
loaded, one field changed, and saved again under a new run directory.
"""

import contextlib
import io
import os
import shutil
import sys

import pytest
import torch

from distconvnet import cli

PROBE = "ckptprobe"
PROBE_SOURCE = '''
import numpy as np
open(__file__ + ".imported", "w").close()

def makew(name, idx, shape, params=()):
    return np.ones(shape, dtype=np.float32)

def makeb(name, shape, params=()):
    return np.ones(shape, dtype=np.float32)
'''
FC10 = "[fc10]\ntype=fc\ninputs=local2\noutputs=10\ninitW=0.01\n"
ENTRY_POINTS = ("resume", "test-only", "write-features", "show")


def command(entry, run_dir, out):
    """The command line of `entry` that loads `run_dir`, writing its own outputs under `out`."""
    return {
        "resume": ["train", "--load-file", run_dir, "--epochs", "3"],
        "test-only": ["train", "--load-file", run_dir, "--test-only", "1"],
        "write-features": ["train", "--load-file", run_dir, "--write-features", "fc10",
                           "--feature-path", out / "features"],
        "show": ["show", "--load-file", run_dir, "--show-preds", "probs",
                 "--save-dir", out / "plots"],
    }[entry]


def run(argv):
    """(exit status, stdout, stderr) of `python -m distconvnet argv`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An importable module that leaves a mark when it is imported."""
    folder = tmp_path / "importable"
    folder.mkdir()
    (folder / f"{PROBE}.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / f"{PROBE}.py.imported"
    sys.modules.pop(PROBE, None)


def tampered(tiny_run, tmp_path, edit):
    """A copy of the tiny run's checkpoint directory whose checkpoint went through `edit`."""
    run_dir = tmp_path / "runs" / "ConvNet__tampered"
    shutil.copytree(tiny_run.run_dir, run_dir)
    [name] = [n for n in os.listdir(run_dir) if n[0].isdigit()]
    state = torch.load(run_dir / name, weights_only=True)
    edit(state)
    torch.save(state, run_dir / name)
    return run_dir


def layer_def_edit(old, new):
    def edit(state):
        assert old in state["layer_def"]
        state["layer_def"] = state["layer_def"].replace(old, new)
    return edit


def files_under(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(status, stderr, *words):
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_stored_init_functions_are_neither_imported_nor_called(entry, tiny_run, tmp_path,
                                                               probe):
    run_dir = tampered(tiny_run, tmp_path, layer_def_edit(
        FC10, FC10 + f"initWFunc={PROBE}.makew()\ninitBFunc={PROBE}.makeb()\n"))
    status, stdout, stderr = run(command(entry, run_dir, tmp_path))
    # The checkpoint is usable: its weights never came from the init functions anyway.
    assert status == 0, stderr
    assert PROBE not in sys.modules
    assert not probe.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_section_named_like_a_path_writes_nothing_there(entry, tiny_run, tmp_path):
    # numpy.savez(layer name, ...) would write <layer name>.npz, as the attacker wants.
    chosen = tmp_path / "chosen"
    assert "." not in str(chosen)
    run_dir = tampered(tiny_run, tmp_path, layer_def_edit(
        FC10, FC10.replace("[fc10]", f"[{chosen}]") + "initWFunc=numpy.savez()\n"))
    before = files_under(run_dir)
    status, stdout, stderr = run(command(entry, run_dir, tmp_path / "out"))
    # probs reads fc10, which is gone: the stored net is unusable, and the line says where.
    assert_one_error_line(status, stderr, f"{run_dir}", "layer definition stored in it",
                          "input layer 'fc10' does not exist")
    assert not list(tmp_path.glob("chosen*"))
    assert files_under(run_dir) == before
    assert not files_under(tmp_path / "out")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unknown_layer_type_is_one_line_naming_the_checkpoint(entry, tiny_run, tmp_path):
    run_dir = tampered(tiny_run, tmp_path, layer_def_edit(FC10, FC10.replace(
        "type=fc", "type=os.system")))
    before = files_under(run_dir)
    status, stdout, stderr = run(command(entry, run_dir, tmp_path / "out"))
    assert_one_error_line(status, stderr, f"{run_dir}", "layer definition stored in it",
                          "layer 'fc10'", "unknown layer type 'os.system'")
    assert files_under(run_dir) == before
    assert not files_under(tmp_path / "out")


def test_shownet_keeps_cost_names_like_paths_inside_its_save_dir(tiny_run, tmp_path):
    def rename_cost(state):
        for history in ("train_outputs", "test_outputs"):
            state[history] = [({"../escaped": sums["logprob"]}, cases)
                              for sums, cases in state[history]]

    run_dir = tampered(tiny_run, tmp_path, rename_cost)
    out = tmp_path / "out"
    status, stdout, stderr = run(["show", "--load-file", run_dir, "--save-dir", out])
    assert status == 0, stderr
    assert [p.name for p in out.iterdir()] == ["cost-.._escaped.png"]
    assert not list(tmp_path.rglob("escaped*"))
