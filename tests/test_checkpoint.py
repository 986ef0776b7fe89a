"""Checkpoint files: safe loading, newest-first resolution, and atomicity under kill -9."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distconvnet import checkpoint
from distconvnet.errors import CheckpointError

WRITER = """
import sys, torch
from distconvnet import checkpoint
run_dir = sys.argv[1]
big = torch.randn(2_000_000)
for k in range(1, 10_000):
    w = big + k
    checkpoint.save(run_dir, 1, k, {"model": {"layers.fc.weights.0": w}, "epoch": 1,
                                    "batchnum": k, "checksum": float(w.double().sum())})
    print(k, flush=True)
"""


def test_save_keeps_only_newest_and_loads(tmp_path):
    run_dir = str(tmp_path / "ConvNet__x")
    os.makedirs(run_dir)
    # Left by writers killed mid-save (removed), and files that are not checkpoints (kept).
    for name in (".2.3.4242.0123abcd.tmp", ".2.12.4242.89abcdef.tmp", ".notes.txt.1.0123abcd.tmp",
                 "metrics.jsonl"):
        (tmp_path / "ConvNet__x" / name).write_bytes(b"partial")
    for batch in (3, 12):
        checkpoint.save(run_dir, 2, batch, {"model": {"layers.fc.biases": torch.ones(3) * batch},
                                            "epoch": 2, "batchnum": batch})
    assert sorted(os.listdir(run_dir)) == [".notes.txt.1.0123abcd.tmp", "2.12", "metrics.jsonl"]
    state = checkpoint.load_state(run_dir)
    assert state["batchnum"] == 12 and state["path"].endswith("2.12")


def test_natural_order_picks_newest(tmp_path):
    for name in ("2.9", "2.10", "10.1"):
        (tmp_path / name).write_bytes(b"")
    assert checkpoint.resolve(str(tmp_path)).endswith("10.1")


def test_bad_paths_and_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_state(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load_state(str(tmp_path))
    (tmp_path / "1.5").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="damaged or not a distconvnet checkpoint"):
        checkpoint.load_state(str(tmp_path))


def test_code_in_a_checkpoint_is_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    torch.save({"format": checkpoint.FORMAT, "evil": Evil()}, str(tmp_path / "1.1"))
    with pytest.raises(CheckpointError, match=r"it holds a Python object, posix\.system, "
                                              r"which is not loaded\)$"):
        checkpoint.load_state(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_kill_at_random_instants_leaves_a_whole_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    for delay in (0.35, 0.5, 0.62, 0.81, 1.03):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, run_dir], stdout=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = [n for n in os.listdir(run_dir) if n[0].isdigit()] if os.path.isdir(run_dir) \
            else []
        if not saved:
            continue        # killed before the first save finished: nothing to check yet
        state = checkpoint.load_state(run_dir)
        weights = state["model"]["layers.fc.weights.0"]
        assert weights.numel() == 2_000_000
        assert float(weights.double().sum()) == pytest.approx(state["checksum"], rel=1e-12)
