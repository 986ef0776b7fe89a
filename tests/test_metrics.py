"""The metrics log (one JSON line per training batch and per test event) against the console
lines of a real short run; truncation on resume; TensorBoard scalars when the package exists."""

import importlib.util
import json
import math
import os
import re

import pytest

from distconvnet import metrics
from trainer_fixtures import TinyRun, batch_ids, run_in_process, tiny_args, write_digit_cifar

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
BATCH_COSTS = re.compile(r"^(\d+\.\d+) \(\S+%\)\.\.\. logprob:  (\S+), (\S+), (\S+?)\s", re.M)
TEST_COSTS = re.compile(r"^=+Test output=+\nlogprob:  (\S+), (\S+), (\S+) $", re.M)
AVERAGES = re.compile(r"^-+Averages-+\nlogprob:  (\S+), (\S+), (\S+) $", re.M)
NUM_BATCHES = len(TinyRun.TRAIN_RANGE) * TinyRun.EPOCHS
# a test every TEST_FREQ batches, and a final one after the last batch
TEST_STEPS = sorted(set(range(TinyRun.TEST_FREQ, NUM_BATCHES + 1, TinyRun.TEST_FREQ))
                    | {NUM_BATCHES})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digit_cifar(tmp_path_factory.mktemp("metrics") / "data")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return TinyRun.train(data, tmp_path_factory.mktemp("save"))


def printed(values):
    return tuple("%.6f" % v for v in values)


def console_costs(stdout, pattern):
    return [tuple(v.rstrip(",") for v in found) for found in pattern.findall(stdout)]


def log_of(run_dir):
    return metrics.read_log(os.path.join(run_dir, metrics.LOG_NAME))


def test_one_line_per_training_batch_matching_the_console(run):
    records = [r for r in log_of(run.run_dir) if r["event"] == "train"]
    console = BATCH_COSTS.findall(run.stdout)
    assert len(records) == len(console) == len(batch_ids(run.stdout)) == NUM_BATCHES
    for step, (record, (batch, *costs)) in enumerate(zip(records, console), start=1):
        assert f"{record['epoch']}.{record['batchnum']}" == batch
        assert record["step"] == step
        assert printed(record["costs"]["logprob"]) == tuple(c.rstrip(",") for c in costs)
        assert record["cases"] == 64 and record["seconds"] > 0 and record["data_wait"] >= 0
        assert math.isclose(record["images_per_sec"], 64 / record["seconds"])
        assert record["rates"] == {"conv1": {"epsW": [0.01], "epsB": 0.02},
                                   "local2": {"epsW": [0.01], "epsB": 0.02},
                                   "fc10": {"epsW": [0.01], "epsB": 0.02}}
    assert [r["progress"] for r in records] == [k / NUM_BATCHES for k in range(NUM_BATCHES)]
    assert all(a["time"] <= b["time"] for a, b in zip(records, records[1:]))


def test_one_line_per_test_event_matching_the_console(run):
    records = log_of(run.run_dir)
    tests = [r for r in records if r["event"] == "test"]
    assert [r["step"] for r in tests] == TEST_STEPS
    assert [printed(r["costs"]["logprob"]) for r in tests] == \
        console_costs(run.stdout, TEST_COSTS)
    assert [printed(r["averages"]["logprob"]) for r in tests] == \
        console_costs(run.stdout, AVERAGES)
    assert all(r["cases"] == 64 and r["images_per_sec"] > 0 for r in tests)
    # each test record follows the training record of its batch, with the same epoch.batch
    for test in tests:
        before = records[records.index(test) - 1]
        assert (before["event"], before["step"]) == ("train", test["step"])
        assert (before["epoch"], before["batchnum"]) == (test["epoch"], test["batchnum"])


def test_resume_drops_batches_after_the_checkpoint_and_continues(data, tmp_path):
    first = TinyRun.train(data, tmp_path)
    path = os.path.join(first.run_dir, metrics.LOG_NAME)
    with open(path, "a") as f:        # what a run killed after its last checkpoint leaves
        f.write(json.dumps({"event": "train", "step": NUM_BATCHES + 1}) + "\n" + '{"event": "t')
    epochs = TinyRun.EPOCHS + 1
    status, stdout, stderr = run_in_process(["--load-file", first.run_dir, "--epochs", epochs])
    assert status == 0, stderr
    records = metrics.read_log(path)
    total = len(TinyRun.TRAIN_RANGE) * epochs
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["step"] for r in records if r["event"] == "test"][:len(TEST_STEPS)] == TEST_STEPS
    assert [printed(r["costs"]["logprob"]) for r in train[NUM_BATCHES:]] == \
        [tuple(c.rstrip(",") for c in costs) for _, *costs in BATCH_COSTS.findall(stdout)]


def test_truncation_keeps_whole_records_up_to_the_step(tmp_path):
    path = tmp_path / metrics.LOG_NAME
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 2, 3)) + '{"st')
    metrics.truncate_after(str(path), 2)
    assert [r["step"] for r in metrics.read_log(str(path))] == [1, 2, 2]


def test_records_are_strict_json_with_null_for_nan(tmp_path):
    log = metrics.open_log(str(tmp_path / "run"), "", is_master=True, resume_step=0)
    log.train_batch(1, 1, step=1, progress=0.0, costs=[("logprob", [math.nan, 1.0, math.inf])],
                    cases=10, seconds=0.5, data_wait=0.01, rates={})
    line = (tmp_path / "run" / metrics.LOG_NAME).read_text()
    assert json.loads(line, parse_constant=pytest.fail)["costs"] == {"logprob": [None, 1.0, None]}


def test_only_the_master_writes(tmp_path):
    log = metrics.open_log(str(tmp_path), "", is_master=False, resume_step=0)
    log.test_event(1, 1, step=1, costs=[("c", [1.0])], averages=[("c", [1.0])], cases=1,
                   seconds=1.0)
    assert not (tmp_path / metrics.LOG_NAME).exists()


def test_test_only_runs_write_no_log(run):
    before = open(os.path.join(run.run_dir, metrics.LOG_NAME)).read()
    status, _, stderr = run_in_process(["--load-file", run.run_dir, "--test-only", "1"])
    assert status == 0, stderr
    assert open(os.path.join(run.run_dir, metrics.LOG_NAME)).read() == before


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_one_line_at_startup(data, tmp_path):
    status, stdout, stderr = train_with_tensorboard(data, tmp_path)
    assert status == 1
    assert stderr == ("error: --tensorboard needs the 'tensorboard' package, which is not "
                      "installed (pip install tensorboard, the [tensorboard] extra)\n")
    assert not batch_ids(stdout)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard package")
def test_tensorboard_scalars_match_the_log(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    status, stdout, stderr = train_with_tensorboard(data, tmp_path)
    assert status == 0, stderr
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    records = log_of(re.findall(r"^Saved checkpoint to (.+)$", stdout, re.M)[-1])
    train = [r for r in records if r["event"] == "train"]
    scalars = events.Scalars("train/logprob_1")
    assert [s.step for s in scalars] == [r["step"] for r in train]
    assert [s.value for s in scalars] == pytest.approx([r["costs"]["logprob"][1] for r in train])
    assert [s.step for s in events.Scalars("test/logprob_0")] == TEST_STEPS
    assert {"lr/conv1.epsW_0", "lr/fc10.epsB", "speed/train_images_per_sec",
            "speed/data_wait_sec", "test_average/logprob_2"} <= set(events.Tags()["scalars"])


def train_with_tensorboard(data, tmp_path):
    """TinyRun's schedule, with --tensorboard <tmp_path>/tb."""
    return run_in_process(tiny_args(data, tmp_path / "save", "--train-range", "1-4",
                                    "--test-range", "5-6", "--epochs", 2, "--test-freq", 3,
                                    "--tensorboard", tmp_path / "tb"))
