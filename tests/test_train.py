"""The trainer's console output (spec §9) and checkpoints (spec §11, issue 3), checked on one
finished run of the tiny net: every line against the spec's formats, and every printed number
that can be recomputed from the checkpoint."""

import os
import re

import numpy as np
import pytest
import torch

from distconvnet import checkpoint, options
from trainer_fixtures import (BATCH_LINE, BIAS_LINE, COSTS_LINE, SCI, WEIGHT_LINE, TinyRun,
                              batch_ids, event_costs)

WEIGHT_LAYERS = ["conv1", "local2", "fc10"]          # layers-tiny.cfg's, in file order
INIT_ORDER = ["data", "labels", "conv1", "pool1", "rnorm1", "local2", "fc10", "probs",
              "logprob", "conv1_neuron", "local2_neuron"]   # data, others, then neurons
RULE = "-" * 55
CLOSING = re.compile(r"^={55} \(\d+\.\d{3} sec\)$")


def expected_batches():
    return [(epoch, b) for epoch in range(1, TinyRun.EPOCHS + 1) for b in TinyRun.TRAIN_RANGE]


def test_startup_lines_in_the_originals_order(tiny_run):
    lines = tiny_run.stdout.splitlines()
    assert lines[0] == "No CUDA device is available: running on the CPU."
    init = lines[1:1 + len(INIT_ORDER)]
    assert [re.search(r"'(\w+)'", line).group(1) for line in init] == INIT_ORDER
    assert all(line.startswith("Initialized ") for line in init)
    assert "Initialized convolutional layer 'conv1' on GPUs 0, producing 8x8 16-channel " \
           "output" in init
    assert "Initialized logistic regression cost 'logprob' on GPUs 0" in init
    rest = lines[1 + len(INIT_ORDER):]
    assert rest[:4] == ["=========================", f"Using PyTorch {torch.__version__}",
                        "=========================", "Training ConvNet"]
    listing = rest[4:4 + len(options.OPTIONS)]
    width = max(len(row.description) for row in options.OPTIONS)   # `<desc padded>: <value>`
    assert all(line[width:width + 2] == ": " for line in listing)
    descriptions = [line[:width].rstrip() for line in listing]
    assert descriptions == sorted(row.description for row in options.OPTIONS)
    by_description = dict(zip(descriptions, listing))
    assert re.fullmatch(r"Minibatch size +: 16 +", by_description["Minibatch size"])
    assert re.fullmatch(r"Test on one batch at a time\? +: 1 +\[DEFAULT\]",
                        by_description["Test on one batch at a time?"])
    assert re.fullmatch(r"Data batch range: testing +: 5-6 +",
                        by_description["Data batch range: testing"])
    tail = rest[4 + len(options.OPTIONS):4 + len(options.OPTIONS) + 6]
    assert tail[0] == "=========================" and tail[1] == "Running on the CPU"
    assert tail[2].startswith("Current time: ")
    assert tail[3] == f"Saving checkpoints to {tiny_run.run_dir}"
    assert tail[4] == "========================="
    assert BATCH_LINE.match(tail[5]) or tail[5].startswith("1.1 (0.00%)... ")


def test_every_batch_line_and_the_progress(tiny_run):
    lines = [line for line in tiny_run.stdout.splitlines() if re.match(r"^\d+\.\d+ \(", line)]
    assert [tuple(map(int, i.split("."))) for i in batch_ids(tiny_run.stdout)] == \
        expected_batches()
    total = TinyRun.EPOCHS * len(TinyRun.TRAIN_RANGE)
    for done, line in enumerate(lines, start=1):
        # spec §2: progress = (batches done - 1) / (epochs x batches per epoch)
        assert f"({100 * (done - 1) / total:.2f}%)... " in line
        if done % TinyRun.TEST_FREQ == 0 or done == total:
            # a test event: the batch line stops after the costs (soft space), time comes later
            assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d\d%\)\.\.\. logprob:  \d+\.\d{6}, "
                                r"\d+\.\d{6}, \d+\.\d{6} ", line), line
        else:
            assert BATCH_LINE.match(line), line


def test_every_test_block_exactly(tiny_run):
    lines = tiny_run.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=" * 22 + "Test output")]
    total = TinyRun.EPOCHS * len(TinyRun.TRAIN_RANGE)
    # every --test-freq batches, and the last batch (ours: a finished run is always saved)
    assert len(starts) == total // TinyRun.TEST_FREQ + 1
    for start in starts:
        block = lines[start:start + 5 + 2 * len(WEIGHT_LAYERS) + 3]
        assert block[0] == "======================Test output======================"
        assert COSTS_LINE.match(block[1]), block[1]
        assert block[2] == "----------------------Averages-------------------------"
        assert COSTS_LINE.match(block[3]), block[3]
        assert block[4] == RULE + " "
        stats = block[5:5 + 2 * len(WEIGHT_LAYERS)]
        for k, layer in enumerate(WEIGHT_LAYERS):
            weights, biases = WEIGHT_LINE.match(stats[2 * k]), BIAS_LINE.match(stats[2 * k + 1])
            assert weights and weights.group(1) == layer, stats[2 * k]
            assert biases and biases.group(1) == layer, stats[2 * k + 1]
            assert all(SCI.match(v) for v in weights.groups()[1:] + biases.groups()[1:])
        assert block[-3] == RULE
        assert block[-2] == f"Saved checkpoint to {tiny_run.run_dir}"
        assert CLOSING.match(block[-1]), block[-1]


def test_printed_numbers_agree_with_the_checkpoint(tiny_run):
    saved = checkpoint.load(tiny_run.run_dir)
    lines = tiny_run.stdout.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("=" * 22 + "Test output"))
    # Test output: this event's sums over its cases; Averages: the last len(test range) events
    sums, cases = saved["test_outputs"][-1]
    assert _costs(lines[last + 1]) == pytest.approx(
        [v / cases for v in sums["logprob"]], abs=1e-6)
    recent = saved["test_outputs"][-len(TinyRun.TEST_RANGE):]
    averaged = np.sum([s["logprob"] for s, _ in recent], axis=0) / sum(n for _, n in recent)
    assert _costs(lines[last + 3]) == pytest.approx(list(averaged), abs=1e-6)
    assert event_costs(tiny_run.stdout)[-1] == pytest.approx(_costs(lines[last + 1]))
    # Weight statistics: mean |W|, mean |increment| and their ratio, from the saved arrays
    for k, layer in enumerate(WEIGHT_LAYERS):
        w = saved["weights"][layer]["weights"][0]
        inc = saved["increments"][layer]["weights"][0]
        printed = [float(v) for v in WEIGHT_LINE.match(lines[last + 5 + 2 * k]).groups()[1:]]
        wanted = [np.abs(w).mean(), np.abs(inc).mean(), np.abs(inc).mean() / np.abs(w).mean()]
        assert printed == pytest.approx(wanted, rel=1e-5)
        b = saved["weights"][layer]["biases"]
        printed = [float(v) for v in BIAS_LINE.match(lines[last + 6 + 2 * k]).groups()[1:]]
        assert printed == pytest.approx(
            [np.abs(b).mean(), np.abs(saved["increments"][layer]["biases"]).mean()], rel=1e-5)


def _costs(line):
    return [float(v) for v in line.split(":", 1)[1].replace(",", " ").split()]


def test_checkpoint_layout_and_public_reader(tiny_run):
    run_dir = tiny_run.run_dir
    assert re.fullmatch(r"ConvNet__\d{4}-\d\d-\d\d_\d\d\.\d\d\.\d\d", os.path.basename(run_dir))
    last_epoch, last_batch = expected_batches()[-1]
    files = [n for n in os.listdir(run_dir) if re.fullmatch(r"\d+\.\d+", n)]
    assert files == [f"{last_epoch}.{last_batch}"]          # only the newest is kept
    saved = checkpoint.load(run_dir)
    assert (saved["epoch"], saved["batchnum"]) == (last_epoch, last_batch)
    assert sorted(saved["weights"]) == sorted(WEIGHT_LAYERS)
    for layer in WEIGHT_LAYERS:
        entry = saved["weights"][layer]
        assert set(entry) == {"weights", "biases"} and len(entry["weights"]) == 1
        assert all(isinstance(a, np.ndarray) and a.dtype == np.float32
                   for a in entry["weights"] + [entry["biases"]])
    assert saved["weights"]["conv1"]["weights"][0].size == 16 * 3 * 3 * 3
    assert saved["weights"]["fc10"]["weights"][0].size == 10 * 4 * 4 * 16
    assert saved["weights"]["fc10"]["biases"].size == 10
    assert len(saved["train_outputs"]) == len(expected_batches())
    assert len(saved["test_outputs"]) == len(event_costs(tiny_run.stdout))
    sums, cases = saved["train_outputs"][0]
    assert cases == 64 and len(sums["logprob"]) == 3
    assert saved["options"]["values"]["minibatch_size"] == 16
    raw = torch.load(os.path.join(run_dir, files[0]), weights_only=True)
    assert raw["epoch"] == last_epoch and "model" in raw and "optimizer" in raw


def test_the_last_batch_is_a_test_event_even_off_the_test_frequency(tiny_run):
    """8 batches, --test-freq 3: events after 3, 6 and (ours) 8, printed like any other."""
    lines = tiny_run.stdout.splitlines()
    last_batch = [line for line in lines if re.match(r"^\d+\.\d+ \(", line)][-1]
    assert last_batch.startswith("2.4 (87.50%)... logprob:  ") and last_batch.endswith(" ")
    assert lines[lines.index(last_batch) + 1].startswith("=" * 22 + "Test output")
    assert CLOSING.match(lines[-1])
    assert "final" not in tiny_run.stdout
