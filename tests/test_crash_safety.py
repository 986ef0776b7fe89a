"""Crash safety (issue 8). A training process SIGKILLed again and again, at random instants and
inside checkpoint saves, resumes each time from a whole checkpoint and ends with the very bits
of a run that was never stopped. A disk that fills during a save stops the run with one line,
keeps the previous checkpoint and leaves no temp file.

See also: test_resume.py (one kill -9 after a checkpoint), test_checkpoint.py (kills of a bare
checkpoint writer), parallel/test_data_parallel.py (lost ranks, torchrun restarts)."""

import errno
import os
import random
import re
import shutil
import signal
import time

import pytest
import torch

from distconvnet import checkpoint, fileio, metrics
from forked_runs import SAVE_PHASES, ForkServer
from test_resume import batch_costs
from test_train_errors import assert_one_error_line, snapshot
from trainer_fixtures import (run_dir_of, run_in_process, subprocess_env, tiny_args,
                              with_dropout)

EPOCHS, BATCHES = 6, 5                  # train range 1-5 of the digit set; a save every batch
KILLS = 8
BATCH_PREFIX = re.compile(r"^(\d+)\.(\d+) \(", re.M)


def kill_plan(rng):
    """[(how, n, delay)]: die in save phase `how` of the run's n-th save, or ("timer") be
    SIGKILLed `delay` seconds after the run's n-th batch line appears. n >= 2, so that every
    run, the first one included, has saved before it dies; n <= 3, so that 8 kills leave
    batches to train."""
    plan = [(phase, rng.choice([2, 3]), 0.0) for phase in SAVE_PHASES]
    plan += [("timer", rng.choice([2, 3]), rng.uniform(0.0, 0.04))
             for _ in range(KILLS - len(SAVE_PHASES))]
    rng.shuffle(plan)
    return plan


def position(epoch, batchnum):
    """Training batches done at the end of batch epoch.batchnum."""
    return (int(epoch) - 1) * BATCHES + int(batchnum)


def kill_on_timer(server, pid, log, batch_lines, delay, timeout=60):
    deadline = time.monotonic() + timeout
    while len(BATCH_PREFIX.findall(log.read_text())) < batch_lines:
        if server.poll(0.002) is not None or time.monotonic() > deadline:
            pytest.fail(f"the run ended or stalled before its kill:\n{log.read_text()}")
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_at_random_instants_and_inside_saves_then_resume_ends_bit_exact(digit_cifar,
                                                                                tmp_path):
    layer_def, layer_params = with_dropout(tmp_path)

    def argv(save):
        return tiny_args(digit_cifar, tmp_path / save, "--seed", 4, "--test-freq", 1,
                         "--epochs", EPOCHS, layer_def=layer_def, layer_params=layer_params)

    server = ForkServer(subprocess_env())
    run_dir, done = None, 0
    try:
        status, unstopped, stderr = run_in_process(argv("unstopped"))
        assert status == 0, stderr
        reference = batch_costs(unstopped)
        plan = kill_plan(random.Random(8))
        for number, kill in enumerate([*plan, None]):
            how, nth, delay = kill or (None, 0, 0.0)
            log = tmp_path / f"run{number}.log"
            pid = server.start(argv("killed") if run_dir is None else ["--load-file", run_dir],
                               log, die=[how, nth] if how in SAVE_PHASES else None)
            if how == "timer":
                kill_on_timer(server, pid, log, nth, delay)
            status, output = server.wait(), log.read_text()
            context = f"run {number} ({how}, {nth}, {delay:.3f}) of {plan}:\n{output[-3000:]}"
            assert status == (0 if kill is None else -signal.SIGKILL), context
            assert "error:" not in output and "Traceback" not in output, context
            # It went on with the batch after the checkpoint it loaded, and trained as the
            # unstopped run did, batches redone after an earlier kill included.
            first = BATCH_PREFIX.search(output)
            assert position(*first.groups()) == done + 1, context
            for batch, costs in batch_costs(output).items():
                assert costs == reference[batch], f"batch {batch} of {context}"
            run_dir = run_dir or run_dir_of(output)
            saved = checkpoint.load_state(run_dir)          # whole, or this raises
            at = position(saved["epoch"], saved["batchnum"])
            assert len(saved["train_outputs"]) == at, context
            announced = done + output.count("Saved checkpoint to ")
            names = os.listdir(run_dir)
            if how in ("mid-write", "before-rename"):       # killed before the rename
                assert at == done + nth - 1 == announced, context
                assert any(n.endswith(".tmp") for n in names), names
            elif how == "after-rename":                     # the older one not yet removed
                assert at == done + nth == announced + 1, context
                assert len([n for n in names if n[0].isdigit()]) == 2, names
            else:
                assert announced <= at <= announced + 1, context
            done = at
    finally:
        server.close()

    assert done == EPOCHS * BATCHES
    assert sorted(os.listdir(run_dir)) == [f"{EPOCHS}.{BATCHES}", metrics.LOG_NAME]
    final, expected = checkpoint.load_state(run_dir), \
        checkpoint.load_state(run_dir_of(unstopped))
    for part in ("model", "optimizer", "train_outputs", "test_outputs"):
        assert_bit_equal(final[part], expected[part], part)
    steps = [r["step"] for r in metrics.read_log(os.path.join(run_dir, metrics.LOG_NAME))
             if r["event"] == "train"]
    assert steps == list(range(1, EPOCHS * BATCHES + 1))


def assert_bit_equal(mine, theirs, where):
    if isinstance(mine, torch.Tensor):
        assert torch.equal(mine, theirs), where
    elif isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), where
        for key in mine:
            assert_bit_equal(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(mine, (list, tuple)):
        assert len(mine) == len(theirs), where
        for index, (a, b) in enumerate(zip(mine, theirs)):
            assert_bit_equal(a, b, f"{where}[{index}]")
    else:
        assert mine == theirs, where


# -- a disk that fills during a save ----------------------------------------------------------

class _FillingDisk:
    """A temp file's handle on a disk with `room` bytes left, as the OS reports it: the write
    that runs out fails with ENOSPC after what fitted is on the disk."""

    def __init__(self, path, mode, room, seen):
        self.handle, self.room = open(path, mode), room
        seen.append(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, payload):
        self.handle.write(payload[:self.room])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def saved_copy(tiny_run, tmp_path):
    copy = tmp_path / "ConvNet__copy"
    shutil.copytree(tiny_run.run_dir, copy)
    return copy


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_disk_that_fills_during_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(
        saved_copy, monkeypatch, failing):
    """ENOSPC from the write itself, or from the fsync that flushes delayed allocations."""
    seen = []
    if failing == "write":
        monkeypatch.setattr(fileio, "open", lambda path, mode: _FillingDisk(path, mode, 4096,
                                                                            seen),
                            raising=False)
    else:
        def fsync(fd):
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync)
    before = snapshot(saved_copy)
    status, stdout, stderr = run_in_process(["--load-file", saved_copy, "--epochs", "3"])
    # 2.4 was saved; the test event after 3.1 (every 3 batches) saves 3.1
    assert_one_error_line(status, stdout, stderr, f"'{saved_copy / '3.1'}'",
                          "No space left on device", "previous checkpoint is kept")
    assert "Saved checkpoint" not in stdout.split("3.1 (")[-1]
    assert len(seen) == 1 and ".3.1." in str(seen[0]), seen     # the temp file of 3.1 ...
    assert not os.path.exists(seen[0])                           # ... is gone
    assert snapshot(saved_copy) == before
    assert checkpoint.load(saved_copy)["batchnum"] == 4
