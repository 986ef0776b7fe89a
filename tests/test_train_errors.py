"""Every user mistake of issue 3 ends with one line on stderr starting with "error:", exit status
1 and no traceback, and leaves what was saved intact. A NaN/Inf cost stops with the original's
`<- error nan or inf!` (spec §7) and keeps the last checkpoint."""

import os
import pickle
import shutil

import pytest

from distconvnet import checkpoint
from trainer_fixtures import (TINY_DEF, TINY_PARAMS, run_convnet, run_in_process, tiny_args)


def assert_one_error_line(status, stdout, stderr, *fragments):
    assert status == 1, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stdout + stderr
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(directory):
    """{checkpoint name: bytes} of a run directory, to prove no checkpoint changed (the
    metrics log next to them may grow)."""
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))
            if n != "metrics.jsonl"}


@pytest.fixture
def saved_copy(tiny_run, tmp_path):
    """A copy of the finished tiny run's checkpoint directory, safe to damage."""
    copy = tmp_path / "ConvNet__copy"
    shutil.copytree(tiny_run.run_dir, copy)
    return copy


def test_missing_data_directory(tmp_path):
    result = run_in_process(tiny_args(tmp_path / "no-such-dir", tmp_path / "save"))
    assert_one_error_line(*result, str(tmp_path / "no-such-dir"))
    assert not (tmp_path / "save").exists()


def test_a_batch_of_the_range_that_does_not_exist(digit_cifar, tmp_path):
    result = run_in_process(tiny_args(digit_cifar, tmp_path, "--train-range", "1-9"))
    assert_one_error_line(*result, "data batch 7 not found", "available: 1-6")


def test_batches_meta_without_data_mean(digit_cifar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digit_cifar, data)
    with open(data / "batches.meta", "rb") as f:
        meta = pickle.load(f)
    del meta["data_mean"]
    with open(data / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    result = run_in_process(tiny_args(data, tmp_path / "save"))
    assert_one_error_line(*result, "batches.meta", "data_mean")


def test_load_file_that_does_not_exist(tmp_path):
    result = run_in_process(["--load-file", tmp_path / "ConvNet__gone"])
    assert_one_error_line(*result, "Error loading checkpoint", "does not exist")


def test_damaged_checkpoint(saved_copy):
    (name,) = [n for n in os.listdir(saved_copy) if n[0].isdigit()]
    data = (saved_copy / name).read_bytes()
    (saved_copy / name).write_bytes(data[:len(data) // 2])
    before = snapshot(saved_copy)
    result = run_in_process(["--load-file", saved_copy])
    assert_one_error_line(*result, "Error loading checkpoint", "damaged")
    assert snapshot(saved_copy) == before


def test_inner_size_cannot_change_on_resume(saved_copy):
    before = snapshot(saved_copy)
    result = run_in_process(["--load-file", saved_copy, "--inner-size", "6", "--epochs", "3"])
    assert_one_error_line(*result, "--inner-size", "cannot be changed")
    assert snapshot(saved_copy) == before


@pytest.mark.parametrize("extra, fragments", [
    (["--mini", "x"], ["--mini", "expected an integer", "'x'"]),
    (["--test-range", "6-5"], ["--test-range", "empty range"]),
    (["--write-features", "fc10"], ["--write-features", "requires option --feature-path"]),
    (["--test-only", "2"], ["--test-only", "expected 0 or 1"]),
    (["--test-freq", "0"], ["--test-freq 0", "expected a positive number"]),
])
def test_invalid_or_conflicting_options(digit_cifar, tmp_path, extra, fragments):
    result = run_in_process(tiny_args(digit_cifar, tmp_path / "save", *extra))
    assert_one_error_line(*result, *fragments)


def test_unknown_layer_type_names_file_line_and_layer(digit_cifar, tmp_path):
    text = TINY_DEF.read_text()
    layer_def = tmp_path / "bad.cfg"
    layer_def.write_text(text.replace("[conv1]\ntype=conv\n", "[conv1]\ntype=convv\n"))
    line = text.splitlines().index("[conv1]") + 2
    result = run_in_process(tiny_args(digit_cifar, tmp_path / "save", layer_def=layer_def))
    assert_one_error_line(*result, f"{layer_def}:{line}:", "layer 'conv1'",
                          "unknown layer type 'convv'")


def test_nan_cost_stops_and_keeps_the_last_checkpoint(saved_copy, tmp_path):
    """Resume with an absurd learning rate: the first resumed batch's cost is no longer finite."""
    params = tmp_path / "exploding.cfg"
    params.write_text(TINY_PARAMS.read_text().replace("epsW=0.01", "epsW=1e30"))
    before = snapshot(saved_copy)
    status, stdout, stderr = run_in_process(["--load-file", saved_copy, "--epochs", "3",
                                             "--layer-params", params])
    assert_one_error_line(status, stdout, stderr, "cost 'logprob' is", "last checkpoint is kept")
    last = stdout.splitlines()[-1]
    assert last.startswith("3.1 (") and last.endswith(" <- error nan or inf!"), last
    assert snapshot(saved_copy) == before
    assert checkpoint.load(saved_copy)["epoch"] == 2


def test_the_real_command_exits_1_without_a_traceback(tmp_path):
    status, stdout, stderr = run_convnet(["--load-file", tmp_path / "nothing-here"])
    assert_one_error_line(status, stdout, stderr, "does not exist")


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"], ["--mini", "32", "--help"]])
def test_no_arguments_or_help_print_the_usage_table(argv):
    status, out, err = run_in_process(argv)
    assert (status, err) == (0, "")
    assert out.startswith("convnet.py usage:") and "--mini <int>" in out
