"""Data-parallel training on the CPU with gloo, two ranks, the tiny net (issue 5): every launcher
gives the one-process weights and numbers, only rank 0 prints, test passes are sharded and
reduced exactly, checkpoints move between world sizes, and a lost rank ends the job in time.
The launchers' tests also run on two GPUs with NCCL, where there are two (marked nccl)."""

import ast
import os
import pickle
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dp_helpers import (REPO, assert_same_history, assert_same_weights, check_like_one_process,
                        child_pids, newest_checkpoint, run_ok, script, single, skeleton,
                        tiny_args, torchrun, worker_env)
from trainer_fixtures import run_in_process

pytestmark = pytest.mark.slow

# The launchers' runs: CPU ranks over gloo; one rank per GPU over NCCL (auto on CUDA).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.nccl)]


@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_two_ranks_train_like_one_process(one_process_on, demo_data, tmp_path, device):
    out, err = run_ok(script("torchrun.sh", tiny_args(demo_data, tmp_path, device=device)),
                      NGPU="2")
    check_like_one_process(one_process_on(device), out, err, tmp_path, device)


@pytest.mark.mpi
@pytest.mark.parametrize("device, backend", [
    ("cpu", "auto"), ("cpu", "mpi"), pytest.param("cuda", "auto", marks=pytest.mark.nccl)])
def test_mpirun_two_ranks_train_like_one_process(one_process_on, demo_data, tmp_path, device,
                                                 backend):
    args = tiny_args(demo_data, tmp_path, "--dist-backend", backend, device=device)
    out, err = run_ok(script("mpirun.sh", args), NGPU="2")
    check_like_one_process(one_process_on(device), out, err, tmp_path, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_gpu_list_starts_one_worker_per_entry(one_process_on, demo_data, tmp_path, device):
    out, err = run_ok(single(tiny_args(demo_data, tmp_path, "--gpu", "0,1", device=device)))
    assert re.search(r"^GPU override +: 0,1 ", out, re.M)
    check_like_one_process(one_process_on(device), out, err, tmp_path, device)


def test_checkpoints_move_between_world_sizes(one_process, demo_data, tmp_path):
    """One epoch on 2 ranks then one on 1, against one epoch on 1 then one on 2."""
    run_ok(torchrun(tiny_args(demo_data, tmp_path / "two")))
    two_then_one = next((tmp_path / "two").glob("ConvNet__*"))
    one_then_two = tmp_path / "one" / "ConvNet__copy"
    shutil.copytree(next(Path(one_process[2]).glob("ConvNet__*")), one_then_two)
    out, _ = run_ok(single(["--load-file", two_then_one, "--epochs", "2"]))
    assert re.search(r"^2\.1 \(", out, re.M) and not re.search(r"^1\.\d \(", out, re.M)
    run_ok(torchrun(["--load-file", one_then_two, "--epochs", "2"]))
    a, b = newest_checkpoint(tmp_path / "two"), newest_checkpoint(tmp_path / "one")
    assert (a["epoch"], a["batchnum"]) == (2, 2) and len(a["train_outputs"]) == 4
    assert_same_weights(a, b)
    assert_same_history(a, b)


def test_sharded_test_only_multiview_and_features_match_one_process(one_process, demo_data,
                                                                    tmp_path):
    run_dir = next(Path(one_process[2]).glob("ConvNet__*"))
    outputs = {}
    for name, launch in (("one", single), ("two", torchrun)):
        shutil.copytree(run_dir, tmp_path / name / "run")
        args = ["--load-file", tmp_path / name / "run", "--test-only", "1", "--multiview-test",
                "1", "--write-features", "fc10", "--feature-path", tmp_path / name / "features"]
        outputs[name], _ = run_ok(launch([str(a) for a in args]))
    lines = {name: re.search(r"^batch 6: \((\{.*\}), (\d+)\) ", out, re.M)
             for name, out in outputs.items()}
    assert lines["one"].group(2) == lines["two"].group(2) == "297"
    sums = {name: ast.literal_eval(m.group(1)) for name, m in lines.items()}
    np.testing.assert_allclose(sums["one"]["logprob"], sums["two"]["logprob"], rtol=1e-6)
    assert skeleton(outputs["one"]).replace("/one/", "/two/") == skeleton(outputs["two"])
    files = {name: pickle.loads((tmp_path / name / "features" / "data_batch_6").read_bytes())
             for name in outputs}
    assert files["one"]["data"].shape == (297, 10)
    np.testing.assert_allclose(files["one"]["data"], files["two"]["data"], atol=1e-6)
    np.testing.assert_array_equal(files["one"]["labels"], files["two"]["labels"])


def start_and_wait_for_checkpoint(command):
    """Start a training job; return it once rank 0 has printed its first checkpoint."""
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=worker_env(DISTCONVNET_TIMEOUT="10"))
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.startswith("Saved checkpoint"):
            return job, lines
    job.wait()
    pytest.fail(f"no checkpoint before the job ended:\n{''.join(lines)[-2000:]}"
                f"{job.stderr.read()[-2000:]}")


def a_worker_of(job):
    """A training process of a torchrun job (convnet.py) or of a spawning one (distconvnet)."""
    workers = [pid for pid in child_pids(job.pid)
               if "convnet" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2, workers
    return max(workers)


@pytest.mark.parametrize("launch, failure", [(torchrun, signal.SIGKILL), (single, signal.SIGSTOP)],
                         ids=["torchrun-dead", "spawn-silent"])
def test_a_lost_rank_ends_the_job_in_time_and_the_checkpoint_stays_whole(demo_data, tmp_path,
                                                                         launch, failure):
    """A dead rank is noticed at once; a silent one (stopped) by the collective timeout, which
    the test sets to 10 s (DISTCONVNET_TIMEOUT)."""
    args = tiny_args(demo_data, tmp_path, "--train-range", "1-5", "--epochs", "1000")
    if launch is single:
        args += ["--gpu", "0,1"]
    job, _ = start_and_wait_for_checkpoint(launch(args))
    worker = a_worker_of(job)
    started = time.monotonic()
    try:
        os.kill(worker, failure)
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert time.monotonic() - started < 60
    assert job.returncode != 0
    saved = newest_checkpoint(tmp_path)
    assert saved["batchnum"] % 2 == 0                       # a test event's checkpoint, whole


def worker_of_rank(job, rank):
    """The training process of `rank` in a torchrun job (its environment says which)."""
    for pid in child_pids(job.pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    pytest.fail(f"no worker of rank {rank}")


def test_a_torchrun_job_restarted_twice_resumes_the_newest_checkpoint_and_ends_like_one_process(
        demo_data, tmp_path):
    """--max-restarts 2: rank 1 is killed in the batch after the first checkpoint, rank 0 in the
    batch after the restarted job's first one. Each restart starts both workers afresh, and
    they resume the newest checkpoint: the job ends with the weights of one process never
    stopped (up to float32 rounding: two ranks sum their gradients in another order)."""
    args = tiny_args(demo_data, tmp_path / "restarted", "--epochs", "3")   # saves 1.2, 2.2, 3.2
    job = subprocess.Popen(torchrun(args, 2, "--max-restarts", "2"), cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=worker_env(DISTCONVNET_TIMEOUT="10"))
    victims = {1: 1, 2: 0}          # after the n-th "Saved checkpoint": the rank to kill
    lines, saves = [], 0
    watchdog = threading.Timer(240, job.kill)      # a hung job fails the test, not hangs it
    watchdog.start()
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith("Saved checkpoint"):
                saves += 1
                if saves in victims:
                    time.sleep(0.2)                         # into the next batch
                    os.kill(worker_of_rank(job, victims[saves]), signal.SIGKILL)
        err = job.stderr.read()
        job.wait(timeout=60)
    finally:
        watchdog.cancel()
        if job.poll() is None:
            job.kill()
    out = "".join(lines)
    assert job.returncode == 0, err[-3000:]
    starts = out.split("Training ConvNet")[1:]               # the first start and two restarts
    # each went on with the batch after the newest checkpoint: 1.2, then 2.2
    assert [re.search(r"^(\d\.\d) \(", start, re.M).group(1) for start in starts] == \
        ["1.1", "2.1", "3.1"]
    assert len(list((tmp_path / "restarted").glob("ConvNet__*"))) == 1
    final = newest_checkpoint(tmp_path / "restarted")
    assert len(final["train_outputs"]) == 6                  # no batch lost, none counted twice
    status, _, stderr = run_in_process(tiny_args(demo_data, tmp_path / "one", "--epochs", "3"))
    assert status == 0, stderr
    one_process = newest_checkpoint(tmp_path / "one")
    assert_same_weights(final, one_process)
    assert_same_history(final, one_process)


def test_ctrl_c_reaches_the_spawned_workers_once(demo_data, tmp_path):
    args = tiny_args(demo_data, tmp_path, "--train-range", "1-5", "--epochs", "1000", "--gpu",
                     "0,1")
    job, _ = start_and_wait_for_checkpoint(single(args))
    workers = child_pids(job.pid)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 130
    assert err.count("Interrupted; checkpoints already written are intact.") == 1
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    newest_checkpoint(tmp_path)                              # still loads


def short_test_batches(demo_data, target):
    """The demo set's meta and two short test batches cut from batch 6: data_batch_7 with one
    case (nothing for rank 1), data_batch_8 with three (with --mini 2, rank 1 gets nothing of
    the second slice)."""
    from distconvnet.providers.batches import read_batch, write_batch
    shutil.copy(demo_data / "batches.meta", target / "batches.meta")
    whole = read_batch(demo_data, 6)
    for number, cases in ((7, slice(0, 1)), (8, slice(1, 4))):
        write_batch(target, number, {"data": np.ascontiguousarray(whole["data"][:, cases]),
                                     "labels": whole["labels"][cases]})
    return target


def test_test_batches_smaller_than_the_world_evaluate_like_one_process(one_process, demo_data,
                                                                       tmp_path):
    """Empty shards: the errors, features and predictions of two ranks are one process's."""
    data = short_test_batches(demo_data, tmp_path)
    run_dir = next(Path(one_process[2]).glob("ConvNet__*"))
    outputs = {}
    for name, launch in (("one", single), ("two", torchrun)):
        shutil.copytree(run_dir, tmp_path / name / "run")
        args = ["--load-file", tmp_path / name / "run", "--data-path", data, "--test-range",
                "7-8", "--mini", "2", "--test-only", "1", "--multiview-test", "1",
                "--write-features", "fc10", "--feature-path", tmp_path / name / "features",
                "--test-out", tmp_path / name / "preds", "--logreg-name", "logprob"]
        outputs[name], _ = run_ok(launch([str(a) for a in args]))
    for batchnum, cases in ((7, 1), (8, 3)):
        found = {name: re.search(rf"^batch {batchnum}: \((\{{.*\}}), (\d+)\) ", out, re.M)
                 for name, out in outputs.items()}
        assert found["one"].group(2) == found["two"].group(2) == str(cases)
        sums = {name: ast.literal_eval(m.group(1))["logprob"] for name, m in found.items()}
        np.testing.assert_allclose(sums["one"], sums["two"], rtol=1e-6)
        assert sums["one"][1:] == sums["two"][1:]                  # the error counts, exactly
        for file_name in (f"features/data_batch_{batchnum}", f"preds/test_preds_{batchnum}"):
            one, two = (pickle.loads((tmp_path / run / file_name).read_bytes())
                        for run in outputs)
            assert one["data"].shape == (cases, 10)
            np.testing.assert_allclose(one["data"], two["data"], atol=1e-6)
            np.testing.assert_array_equal(one.get("labels"), two.get("labels"))
    test_lines = {name: re.search(r"Test output=+\n(.*)\n", out).group(1)
                  for name, out in outputs.items()}
    assert test_lines["one"].split(", ")[1:] == test_lines["two"].split(", ")[1:]
