"""Careless and hostile input beyond pickles (issue 22), through the trainer's command line: one
run per directory (a lock, and no saving into another run's directory unless asked), a save
path checked before training, checkpoints checked on load (damaged records, contents that do
not fit), and cases that ended in a traceback or misled. Each ends with one `error:` line
naming the file (and record, line or layer), exit status 1, and nothing saved changed; where
the issue chose a warning instead, the run goes on and says so.

Hostile pickles are in test_hostile_pickles.py.
"""

import os
import pickle
import shutil
import signal
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from distconvnet import checkpoint, metrics
from test_bad_input_zoo import Case, Zoo, line_of
from test_train_errors import assert_one_error_line, snapshot
from trainer_fixtures import (REPO, TINY_DEF, TINY_PARAMS, batch_ids, convnet_command,
                              run_in_process, subprocess_env, tiny_args, with_dropout)

CONV1_TYPE_LINE = TINY_DEF.read_text().splitlines().index("[conv1]") + 2


def copy_of(tiny_run, tmp_path):
    """A copy of the finished tiny run's directory, as another run's, safe to damage."""
    copy = tmp_path / "ConvNet__copy"
    shutil.copytree(tiny_run.run_dir, copy)
    return copy


# -- one run per directory ---------------------------------------------------------------------


def test_a_second_run_on_one_directory_stops_and_a_dead_runs_lock_is_taken_over(
        digit_cifar, tmp_path):
    run_dir = tmp_path / "shared"
    argv = tiny_args(digit_cifar, tmp_path / "unused", "--save-file", run_dir, "--test-freq", 1,
                     "--epochs", 1000)
    first = subprocess.Popen(convnet_command(argv), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    try:
        for line in first.stdout:
            if line.startswith("Saved checkpoint to "):
                break
        first.send_signal(signal.SIGSTOP)        # holding its lock, leaving the CPU to us
        # It resumes the running one's checkpoint (an existing --save-file does), then stops.
        result = run_in_process([*argv, "--epochs", 1])
        assert_one_error_line(*result, f"'{run_dir}' is in use by another run (pid "
                                       f"{first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    epoch = checkpoint.load_state(run_dir)["epoch"]
    status, stdout, stderr = run_in_process(["--load-file", run_dir, "--epochs", epoch + 1])
    assert status == 0, stderr
    assert stderr.startswith(f"warning: {run_dir}: taking over the lock of a run that is gone "
                             f"(pid {first.pid} on "), stderr
    assert all(checkpoint.is_checkpoint_name(n) or n == metrics.LOG_NAME
               for n in os.listdir(run_dir)), os.listdir(run_dir)    # the lock is gone


def test_no_run_saves_into_another_runs_directory_unless_asked(tiny_run, tmp_path):
    other = copy_of(tiny_run, tmp_path)
    log = other / metrics.LOG_NAME
    before, log_before = snapshot(other), log.read_text()
    argv = ["--load-file", tiny_run.run_dir, "--save-file", other, "--epochs", 3]
    assert_one_error_line(*run_in_process(argv), f"'{other}' holds another run's checkpoint "
                                                 f"2.4", "--overwrite-save-file 1")
    assert (snapshot(other), log.read_text()) == (before, log_before)

    status, stdout, stderr = run_in_process([*argv, "--overwrite-save-file", 1])
    assert status == 0, stderr
    assert sorted(os.listdir(other)) == ["3.4", metrics.LOG_NAME]
    steps = [r["step"] for r in metrics.read_log(log) if r["event"] == "train"]
    assert steps == [9, 10, 11, 12]         # this run's batches only, none of the other's


def test_a_save_path_that_cannot_be_written_stops_before_training(digit_cifar, tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("not a directory")
    status, stdout, stderr = run_in_process(tiny_args(digit_cifar, a_file, "--epochs", 1))
    assert_one_error_line(status, stdout, stderr, f"cannot write checkpoints to '{a_file}/"
                                                  f"ConvNet__", "Not a directory")
    assert batch_ids(stdout) == []
    assert a_file.read_text() == "not a directory"


# -- checkpoints -------------------------------------------------------------------------------

def flip_bytes_of(tensor_key):
    """Invert 256 bytes in the middle of the zip record that holds model[tensor_key]."""
    def damage(path, state):
        data = state["model"][tensor_key].numpy().tobytes()
        raw = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            (record,) = [i for i in archive.infolist() if archive.read(i) == data]
        start = raw.index(data, record.header_offset) + len(data) // 2 - 128
        raw[start:start + 256] = bytes(b ^ 0xFF for b in raw[start:start + 256])
        path.write_bytes(raw)
        return [f"is damaged: record '{record.filename}' (tensor model['{tensor_key}']",
                "fails its CRC-32 check"]
    return damage


def edited(edit, *fragments):
    """Rewrite the checkpoint with `edit(state)` applied."""
    def damage(path, state):
        edit(state)
        torch.save(state, path)
        return [f.format(file=path) for f in fragments]
    return damage


def other_text(state):
    state["layer_def"] = state["layer_def"].replace("[conv1]\ntype=conv\n", "[conv1]\ntype=convv\n")


CHECKPOINT_CASES = {
    "flipped-bytes": flip_bytes_of("layers.fc10.weights.0"),
    "wrong-tensor-shape": edited(
        lambda s: s["model"].update({"layers.fc10.weights.0": torch.zeros(10, 255)}),
        "'{file}': tensor 'layers.fc10.weights.0' has shape (10, 255); its net needs (10, 256)"),
    "missing-tensor": edited(lambda s: s["model"].pop("layers.fc10.biases"),
                             "'{file}' lacks the tensor 'layers.fc10.biases' of its net"),
    "missing-rng-state": edited(lambda s: s["rng"].pop("torch"),
                                "'{file}' is incomplete or damaged: it has no random state"),
    "option-of-wrong-type": edited(
        lambda s: s["options"]["values"].update(minibatch_size="sixteen"),
        "'{file}' is incomplete or damaged: its option --mini is 'sixteen', not an integer"),
    "cfg-error-in-stored-text": edited(
        other_text, "{file} (the layer definition stored in it):" + str(CONV1_TYPE_LINE)
        + ": layer 'conv1': unknown layer type 'convv'"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
def test_a_damaged_or_unfitting_checkpoint_is_one_line(tiny_run, tmp_path, damage):
    copy = copy_of(tiny_run, tmp_path)
    path = copy / "2.4"
    fragments = damage(path, torch.load(path, weights_only=True))
    before = snapshot(copy)
    status, stdout, stderr = run_in_process(["--load-file", copy, "--epochs", 3])
    assert_one_error_line(status, stdout, stderr, *fragments)
    assert str(TINY_DEF) not in stderr
    assert snapshot(copy) == before


# -- one line where a traceback was ----------------------------------------------------------

def data_batch(zoo, edit):
    data = zoo.cifar_copy()
    with open(data / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    edit(batch)
    with open(data / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return Case(tiny_args(data, zoo.tmp_path / "save", "--epochs", 1), [str(data / "data_batch_1")])


def meta(zoo, **values):
    data = zoo.cifar_copy()
    with open(data / "batches.meta", "rb") as f:
        meta = pickle.load(f)
    meta.update(values)
    with open(data / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Case(tiny_args(data, zoo.tmp_path / "save", "--epochs", 1), [str(data / "batches.meta")])


def with_fragments(case, *fragments):
    return Case(case.argv, case.fragments + list(fragments), case.kept)


def cfg_case(zoo, old, new, at, *fragments, params=False):
    """layers-tiny.cfg (or its params with `params`) with `old` replaced by `new`; the error
    names the line of `at`, or no line if `at` is None."""
    source = TINY_PARAMS if params else TINY_DEF
    text = source.read_text()
    assert old in text
    path = zoo.cfg("params.cfg" if params else "layers.cfg", text.replace(old, new))
    where = f"{path}:{line_of(path, at)}:" if at else f"{path}:"
    files = {"layer_params" if params else "layer_def": path}
    return Case(tiny_args(zoo.fixture("digit_cifar"), zoo.tmp_path / "save", "--epochs", 1,
                          **files), [where, *fragments])


def zero_cases(batch):
    batch["data"], batch["labels"] = batch["data"][:, :0], []


TRACEBACK_CASES = {
    "zero-case-batch": lambda zoo: with_fragments(
        data_batch(zoo, zero_cases), ": the batch has no cases"),
    "label-10**400": lambda zoo: with_fragments(
        data_batch(zoo, lambda b: b["labels"].__setitem__(3, 10**400)),
        ": expected 'labels', a list of 64 class indices"),
    "img_size-not-a-number": lambda zoo: with_fragments(
        meta(zoo, img_size="ten"), ": expected 'img_size' to be an integer >= 1, got 'ten'"),
    "data_mean-of-strings": lambda zoo: with_fragments(
        meta(zoo, data_mean=np.array(["x"] * 300)), ": refusing a numpy array of dtype 'U1'"),
    "train-range-of-a-billion": lambda zoo: Case(
        tiny_args(zoo.fixture("digit_cifar"), zoo.tmp_path / "save", "--train-range",
                  "1-1000000000"), ["--train-range: 1-1000000000 has more than 1,000,000"]),
    "filters-1e8": lambda zoo: cfg_case(
        zoo, "[local2]\ntype=local\ninputs=rnorm1\nfilters=16",
        "[local2]\ntype=local\ninputs=rnorm1\nfilters=100000000", "[local2]",
        "layer 'local2': its 232,000,000,000 weights need", "GiB of memory of this machine"),
    "fc-outputs-1e9": lambda zoo: cfg_case(
        zoo, "[fc10]\ntype=fc\ninputs=local2\noutputs=10", "[fc10]\ntype=fc\ninputs=local2"
        "\noutputs=1000000000", "[fc10]", "layer 'fc10': its 257,000,000,000 weights need"),
    "4000-digit-integer": lambda zoo: cfg_case(
        zoo, "inputs=data\nchannels=3\nfilters=16\n", "inputs=data\nchannels=3\nfilters="
        + "1" * 4000 + "\n", "filters=" + "1" * 4000, "layer 'conv1': filters='1111",
        "expected an integer below 10^18"),
    "dot-in-a-layer-name": lambda zoo: cfg_case(
        zoo, "[pool1]\ntype=pool\npool=max\ninputs=conv1", "[pool.1]\ntype=pool\npool=max\n"
        "inputs=conv1", "[pool.1]", "layer 'pool.1': a layer name cannot contain '.'"),
    "empty-layer-def": lambda zoo: Case(
        tiny_args(zoo.fixture("digit_cifar"), zoo.tmp_path / "save",
                  layer_def=zoo.cfg("empty.cfg", "# nothing here yet\n")),
        [f"{zoo.tmp_path / 'empty.cfg'}: defines no layers"]),
    "epsW-inf": lambda zoo: cfg_case(
        zoo, "[conv1]\nepsW=0.01", "[conv1]\nepsW=inf", "epsW=inf",
        "layer 'conv1': learning rate 'inf' is not a finite number", params=True),
}


@pytest.mark.parametrize("build", TRACEBACK_CASES.values(), ids=TRACEBACK_CASES.keys())
def test_what_ended_in_a_traceback_is_one_line(request, tmp_path, build):
    case = build(Zoo(request, tmp_path))
    assert_one_error_line(*run_in_process(case.argv), *case.fragments)
    assert not (tmp_path / "save").exists()


def test_layer_def_of_another_net_on_resume_is_ignored_and_said_so(tiny_run, tmp_path):
    """spec §11.4: the checkpoint's net trains; the listing names its file, and a warning the
    one typed, which differs."""
    copy = copy_of(tiny_run, tmp_path)
    other_def, _ = with_dropout(tmp_path)
    status, stdout, stderr = run_in_process(["--load-file", copy, "--epochs", 3,
                                             "--layer-def", other_def])
    assert status == 0, stderr
    assert f"warning: --layer-def {other_def} is ignored: a resumed run trains the net stored " \
           f"in its checkpoint ({copy / '2.4'})" in stdout
    (listed,) = [line for line in stdout.splitlines()
                 if line.startswith("Layer definition file")]
    assert listed.split(": ", 1)[1].split()[0] == str(TINY_DEF)
    assert "drop2" not in stdout
