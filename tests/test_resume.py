"""Stop and resume (issue 3, spec §3.3, §11.4): after a real kill -9 the run continues with the
batch after its checkpoint's, with the same numbering, and (with --seed) ends with the very
weights of a run that was never stopped; an edited layer-params file takes effect; saves go to
the loaded checkpoint's directory, or to --save-file."""

import os
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest

from distconvnet import checkpoint
from trainer_fixtures import (REPO, TINY_PARAMS, batch_ids, convnet_command, run_dir_of,
                              run_in_process, subprocess_env, tiny_args, with_dropout)

BATCH_START = re.compile(r"^(\d+\.\d+) \(\d+\.\d\d%\)\.\.\. (logprob:  \S+ \S+ \S+)")


def batch_costs(stdout):
    """{'1.4': 'logprob:  2.1, 0.7, 0.7', ...}: each batch line's printed costs."""
    found = (BATCH_START.match(line) for line in stdout.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def all_batches(epochs, batch_range=range(1, 6)):
    return [f"{e}.{b}" for e in range(1, epochs + 1) for b in batch_range]


def checkpoint_names(run_dir):
    return sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"\d+\.\d+", n))


def kill_after_checkpoint(argv, batches_after=2, timeout=120):
    """Start `python convnet.py argv`, wait for its first checkpoint and `batches_after` more
    batch lines, SIGKILL it; returns (its output so far, its checkpoint directory)."""
    process = subprocess.Popen(convnet_command(argv), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    seen, run_dir, after = [], None, 0
    try:
        for line in process.stdout:
            seen.append(line)
            if run_dir is None and line.startswith("Saved checkpoint to "):
                run_dir = line[len("Saved checkpoint to "):].strip()
            elif run_dir is not None and BATCH_START.match(line):
                after += 1
                if after == batches_after:
                    break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=timeout)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert run_dir is not None, "".join(seen)
    return "".join(seen), run_dir


@pytest.mark.slow
def test_kill_9_then_resume_continues_and_matches_an_unstopped_run(digit_cifar, tmp_path):
    """With dropout, random crops and flips, and --seed: bit-exact on the CPU."""
    layer_def, layer_params = with_dropout(tmp_path)
    common = ["--seed", "11", "--test-freq", "3"]

    def argv(save, epochs):
        return tiny_args(digit_cifar, tmp_path / save, *common, "--epochs", epochs,
                         layer_def=layer_def, layer_params=layer_params)

    killed_output, run_dir = kill_after_checkpoint(argv("killed", 200))
    saved = checkpoint.load(run_dir)
    position = all_batches(3).index(f"{saved['epoch']}.{saved['batchnum']}")
    # The schedules of layer-params-tiny.cfg are constant, so shortening --epochs from 200 to 3
    # on resume changes no learning rate: the resumed run must retrace the unstopped one.
    status, resumed, stderr = run_in_process(["--load-file", run_dir, "--epochs", "3"])
    assert status == 0, stderr
    assert "Initialized" not in resumed                      # spec §9.1: not on resume
    assert batch_ids(resumed) == all_batches(3)[position + 1:]
    assert run_dir_of(resumed) == run_dir and checkpoint_names(run_dir) == ["3.5"]

    status, unstopped, stderr = run_in_process(argv("unstopped", 3))
    assert status == 0, stderr
    reference = batch_costs(unstopped)
    for batch, costs in batch_costs(resumed).items():
        assert costs == reference[batch], batch
    for batch, costs in batch_costs(killed_output).items():   # incl. those redone on resume
        assert costs == reference[batch], batch
    assert_same_weights(checkpoint.load(run_dir), checkpoint.load(run_dir_of(unstopped)))


def assert_same_weights(a, b):
    assert sorted(a["weights"]) == sorted(b["weights"])
    for kind in ("weights", "increments"):
        for layer, entry in a[kind].items():
            for mine, theirs in zip(entry["weights"] + [entry["biases"]],
                                    b[kind][layer]["weights"] + [b[kind][layer]["biases"]]):
                np.testing.assert_array_equal(mine, theirs, err_msg=f"{kind} of {layer}")


def test_an_edited_layer_params_file_takes_effect_on_resume(digit_cifar, tmp_path):
    params = tmp_path / "layer-params.cfg"
    params.write_text(TINY_PARAMS.read_text())
    status, first, stderr = run_in_process(tiny_args(
        digit_cifar, tmp_path, "--epochs", "1", "--test-freq", "5", layer_params=params))
    assert status == 0, stderr
    run_dir = run_dir_of(first)
    before = checkpoint.load(run_dir)["weights"]

    edited = params.read_text().replace("[conv1]\nepsW=0.01\nepsB=0.02",
                                        "[conv1]\nepsW=0\nepsB=0")
    assert edited != params.read_text()
    params.write_text(edited)
    status, resumed, stderr = run_in_process(["--load-file", run_dir, "--epochs", "2"])
    assert status == 0, stderr
    lines = resumed.splitlines()
    heading = lines.index(f"Layer parameters changed since the checkpoint ({params}):")
    assert lines[heading + 1:heading + 3] == ["  Layer 'conv1' epsW: 0.01 -> 0",
                                              "  Layer 'conv1' epsB: 0.02 -> 0"]
    assert not lines[heading + 3].startswith("  Layer ")
    assert batch_ids(resumed) == all_batches(2)[5:]

    after = checkpoint.load(run_dir)["weights"]
    # epsW = epsB = 0: conv1 is not learned at all (not even decayed, spec §5.1) ...
    np.testing.assert_array_equal(after["conv1"]["weights"][0], before["conv1"]["weights"][0])
    np.testing.assert_array_equal(after["conv1"]["biases"], before["conv1"]["biases"])
    # ... while the layers whose rates were kept go on learning
    for layer in ("local2", "fc10"):
        assert not np.array_equal(after[layer]["weights"][0], before[layer]["weights"][0])


def test_unchanged_params_print_no_changes(tiny_run, tmp_path):
    copy = tmp_path / "ConvNet__copy"
    shutil.copytree(tiny_run.run_dir, copy)
    status, resumed, stderr = run_in_process(["--load-file", copy, "--epochs", "3"])
    assert status == 0, stderr
    assert "Layer parameters changed" not in resumed
    assert batch_ids(resumed) == all_batches(3, range(1, 5))[8:]


def test_save_file_auto_resumes_and_a_moved_checkpoint_saves_where_it_now_is(
        digit_cifar, tmp_path):
    first_dir, moved_dir = tmp_path / "first", tmp_path / "moved"
    argv = tiny_args(digit_cifar, tmp_path, "--save-file", first_dir, "--test-freq", "5")
    status, stdout, stderr = run_in_process([*argv, "--epochs", "1"])
    assert status == 0, stderr
    assert run_dir_of(stdout) == str(first_dir) and checkpoint_names(first_dir) == ["1.5"]
    # spec §3.2: the same command again, --save-file now existing, resumes from it
    status, stdout, stderr = run_in_process([*argv, "--epochs", "2"])
    assert status == 0, stderr
    assert batch_ids(stdout) == all_batches(2)[5:] and checkpoint_names(first_dir) == ["2.5"]
    # spec §3.3: a resume saves into the loaded checkpoint's directory, wherever it now is
    shutil.copytree(first_dir, moved_dir)
    status, stdout, stderr = run_in_process(["--load-file", moved_dir, "--epochs", "3"])
    assert status == 0, stderr
    assert run_dir_of(stdout) == str(moved_dir) and checkpoint_names(moved_dir) == ["3.5"]
    assert checkpoint_names(first_dir) == ["2.5"]
