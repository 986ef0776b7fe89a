"""--test-only, --multiview-test and --write-features on a saved tiny net (spec §3.4, §9.2,
§10.4, §12.1). The expected numbers are computed here by hand: the crops, the mean subtraction
and the 9-view averaging straight from the pickled batch files, the costs from the probabilities;
only the net's forward pass (tested layer by layer elsewhere) is borrowed from distconvnet."""

import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from distconvnet import checkpoint
from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet
from trainer_fixtures import COSTS_LINE, TinyRun, WEIGHT_LINE, run_in_process

INNER = 8
BATCH_LINE = re.compile(r"^batch (\d+): \(\{'logprob': \[(\S+), (\S+), (\S+)\]\}, (\d+)\) "
                        r"\(\d+\.\d{3} sec\)$")


@pytest.fixture(scope="module")
def saved(tiny_run, tmp_path_factory):
    """A private copy of the tiny run's checkpoint directory."""
    copy = tmp_path_factory.mktemp("test-only") / "ConvNet__saved"
    shutil.copytree(tiny_run.run_dir, copy)
    return copy


@pytest.fixture(scope="module")
def net(saved):
    """The saved net, rebuilt from the checkpoint's own cfg texts and weights."""
    state = checkpoint.load_state(saved)
    dims = {0: 3 * INNER * INNER, 1: 1}
    model = ConvNet("(checkpoint)", "(checkpoint)", BuildContext(dims.__getitem__, 10),
                    layer_def_text=state["layer_def"], layer_params_text=state["layer_params"])
    model.load_state_dict(state["model"])
    return model.eval()


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def views(data_path, batchnum, origins):
    """The batch's crops at each (y, x) origin, mean-subtracted as the cifar provider does:
    data + 1 (the --scalar-mean -1 quirk, spec §15) − the centre crop of the mean image."""
    meta = read_pickle(data_path / "batches.meta")
    batch = read_pickle(data_path / f"data_batch_{batchnum}")
    size = meta["img_size"]
    images = batch["data"].T.reshape(-1, 3, size, size).astype(np.float32)
    border = (size - INNER) // 2
    mean = meta["data_mean"].reshape(3, size, size)[:, border:border + INNER,
                                                    border:border + INNER]
    crops = [images[:, :, y:y + INNER, x:x + INNER] + 1.0 - mean for y, x in origins]
    return crops, np.asarray(batch["labels"])


def outputs(net, crops, layer):
    """The layer's test-mode outputs for each crop, averaged over the crops."""
    with torch.no_grad():
        acts = [net([torch.from_numpy(np.ascontiguousarray(c)),
                     torch.zeros(len(c))], keep=[layer]).acts[layer].flatten(1).double()
                for c in crops]
    return (sum(acts) / len(acts)).numpy()


def cost_sums(probs, labels):
    """logreg's raw sums for top-1: Σ −log p(label), Σ errors (twice: topk=1), as printed."""
    logprob = -np.log(probs[np.arange(len(labels)), labels]).sum()
    errors = float((probs.argmax(axis=1) != labels).sum())
    return np.array([logprob, errors, errors])


def expected_sums(net, data_path, origins):
    per_batch = {}
    for batchnum in TinyRun.TEST_RANGE:
        crops, labels = views(data_path, batchnum, origins)
        per_batch[batchnum] = (cost_sums(outputs(net, crops, "probs"), labels), len(labels))
    return per_batch


def printed_batches(stdout):
    found = [BATCH_LINE.match(line) for line in stdout.splitlines()]
    return {int(m.group(1)): (np.array([float(m.group(k)) for k in (2, 3, 4)]), int(m.group(5)))
            for m in found if m}


def printed_test_output(stdout):
    lines = stdout.splitlines()
    start = lines.index("======================Test output======================")
    assert lines[start - 1] == ""              # the original's leading newline
    assert COSTS_LINE.match(lines[start + 1])
    return np.array([float(v) for v in lines[start + 1].split(":")[1].replace(",", " ").split()])


def check_against(stdout, expected):
    printed = printed_batches(stdout)
    assert sorted(printed) == TinyRun.TEST_RANGE
    for batchnum, (sums, cases) in expected.items():
        assert printed[batchnum][1] == cases
        np.testing.assert_allclose(printed[batchnum][0], sums, rtol=1e-5, atol=1e-4)
    totals = sum(s for s, _ in expected.values()) / sum(n for _, n in expected.values())
    np.testing.assert_allclose(printed_test_output(stdout), totals, atol=2e-6)
    return totals


def test_each_batch_line_is_followed_by_its_costs_per_case(saved):
    status, stdout, stderr = run_in_process(["--load-file", saved, "--test-only", "1"])
    assert status == 0, stderr
    lines = stdout.splitlines()
    for batchnum, (sums, cases) in printed_batches(stdout).items():
        after = lines[lines.index(next(line for line in lines
                                       if line.startswith(f"batch {batchnum}: "))) + 1]
        name, values = after.split(":  ")
        assert name == "    logprob"
        np.testing.assert_allclose([float(v) for v in values.split(", ")], sums / cases,
                                   atol=1e-6)


def checkpoint_files(directory):
    return {n: (directory / n).read_bytes() for n in os.listdir(directory) if n[0].isdigit()}


def test_test_only_covers_the_whole_test_range(saved, net, digit_cifar):
    before = checkpoint_files(saved)
    status, stdout, stderr = run_in_process(["--load-file", saved, "--test-only", "1"])
    assert status == 0, stderr
    check_against(stdout, expected_sums(net, digit_cifar, [(1, 1)]))
    lines = stdout.splitlines()
    rule = lines.index("------------------------------------------------------- ")
    assert [WEIGHT_LINE.match(line).group(1) for line in lines[rule + 1:] if "weights" in line] \
        == ["conv1", "local2", "fc10"]
    assert "Averages" not in stdout and "Saved checkpoint" not in stdout
    assert "Training ConvNet" not in stdout            # no training banner, as the original
    assert checkpoint_files(saved) == before


def test_multiview_averages_the_nine_crops(saved, net, digit_cifar):
    status, stdout, stderr = run_in_process(["--load-file", saved, "--test-only", "1",
                                             "--multiview-test", "1"])
    assert status == 0, stderr
    grid = [(y, x) for y in (0, 1, 2) for x in (0, 1, 2)]      # spec §10.4: {0, b, 2b}², b=1
    multiview = check_against(stdout, expected_sums(net, digit_cifar, grid))
    single = sum(s for s, _ in expected_sums(net, digit_cifar, [(1, 1)]).values()) / 128
    assert abs(multiview[0] - single[0]) > 1e-4


def test_write_features_in_the_seeds_form(saved, net, digit_cifar, tmp_path):
    """`--write-features=fc10 --feature-path/abs/path`, without --test-only (the user's page)."""
    target = tmp_path / "fc10-features"
    status, stdout, stderr = run_in_process(["--load-file", saved, "--write-features=fc10",
                                             f"--feature-path{target}"])
    assert status == 0, stderr
    assert sorted(os.listdir(target)) == ["batches.meta", "data_batch_5", "data_batch_6"]
    for batchnum in TinyRun.TEST_RANGE:
        assert f"Wrote feature file {target}/data_batch_{batchnum}" in stdout.splitlines()
        features = read_pickle(target / f"data_batch_{batchnum}")
        crops, labels = views(digit_cifar, batchnum, [(1, 1)])
        assert features["data"].dtype == np.float32 and features["data"].shape == (64, 10)
        np.testing.assert_allclose(features["data"], outputs(net, crops, "fc10"), atol=1e-5)
        assert features["labels"].shape == (1, 64)
        np.testing.assert_array_equal(features["labels"][0], labels)
    assert read_pickle(target / "batches.meta") == {"source_model": str(saved), "num_vis": 10,
                                                    "batch_size": 64}
    assert "======================Test output======================" in stdout


def test_multiview_features_are_the_averaged_outputs(saved, net, digit_cifar, tmp_path):
    status, _, stderr = run_in_process(["--load-file", saved, "--write-features", "probs",
                                        "--feature-path", tmp_path, "--multiview-test", "1"])
    assert status == 0, stderr
    grid = [(y, x) for y in (0, 1, 2) for x in (0, 1, 2)]
    crops, _ = views(digit_cifar, 6, grid)
    features = read_pickle(tmp_path / "data_batch_6")["data"]
    np.testing.assert_allclose(features, outputs(net, crops, "probs"), atol=1e-6)
