"""The metrics log: one JSON line per training batch and per test event, so that other tools can
read a run, and optionally the same numbers as TensorBoard scalars (`--tensorboard DIR`).

The log is `<checkpoint directory>/metrics.jsonl`, next to the checkpoints; a resumed run
continues it. Each line is one object:

    {"event": "train", "epoch": 1, "batchnum": 3, "step": 3, "progress": 0.2, "cases": 300,
     "costs": {"logprob": [2.1, 0.7, 0.7]}, "seconds": 0.79, "images_per_sec": 380.1,
     "data_wait": 0.0004, "rates": {"conv1": {"epsW": [0.001], "epsB": 0.002}, ...},
     "time": 1764103128.52}
    {"event": "test", "epoch": 1, "batchnum": 5, "step": 5, "cases": 297,
     "costs": {...}, "averages": {...}, "seconds": 0.41, "images_per_sec": 724.4, "time": ...}

`costs` and `averages` are the values the console prints (spec §9.2: the "Test output" and
"Averages" sections for a test event); `step` counts training batches from the start of
training, the x axis of every curve; `seconds` is the wall time of a training batch (as the
console prints it), of which `data_wait` was spent waiting for its data, or the time of a test
event; `rates` are the learning rates epsW/epsB
in force; `time` is Unix time. A NaN or infinite cost or rate is written as null (strict JSON).
"""

import json
import math
import os
import sys
import time

from .errors import OptionError
from .fileio import atomic_write

LOG_NAME = "metrics.jsonl"


def open_log(run_dir, tensorboard_dir, is_master, resume_step):
    """The metrics object of a run. Every rank checks that TensorBoard can be used, so that a
    missing package stops all of them at startup; only the master writes anything.

    run_dir: the checkpoint directory, or None for no JSONL log (e.g. --test-only runs);
    resume_step: training batches done at the checkpoint the run starts from (0 when new).
    """
    writer_class = summary_writer_class() if tensorboard_dir else None
    if not is_master:
        return MetricsLog(None)
    path = os.path.join(run_dir, LOG_NAME) if run_dir else None
    if path is not None:
        truncate_after(path, resume_step)
    # purge_step: TensorBoard hides what a killed run logged after its checkpoint, as above
    writer = writer_class(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None) \
        if writer_class else None
    return MetricsLog(path, writer)


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise OptionError("--tensorboard needs the 'tensorboard' package, which is not "
                          "installed (pip install tensorboard, the [tensorboard] extra)"
                          ) from None
    return SummaryWriter


def truncate_after(path, step):
    """Drop the records of batches after `step`: a run killed after its last checkpoint redoes
    them on resume, so the log keeps matching the checkpoint's history."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept).encode("utf-8"))


def _step_of(line):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None            # a line cut short by a kill


def read_log(path):
    """The records of a metrics log, in order (for tools and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends records to the JSONL file (created on first use) and mirrors them to a
    TensorBoard SummaryWriter; either may be None. Each record is flushed as it is written,
    so a log read during training, or after a kill, is complete up to the last batch."""

    def __init__(self, path, writer=None):
        self.path, self.writer = path, writer

    def train_batch(self, epoch, batchnum, *, step, progress, costs, cases, seconds, data_wait,
                    rates):
        """costs: [(cost name, printed values)]; rates: optimizer.current_rates()."""
        record = {"event": "train", "epoch": epoch, "batchnum": batchnum, "step": step,
                  "progress": progress, "cases": cases, "costs": _costs(costs),
                  "seconds": seconds, "images_per_sec": _per_second(cases, seconds),
                  "data_wait": data_wait,
                  "rates": {layer: {"epsW": [_finite(r) for r in rate["epsW"]],
                                    "epsB": _finite(rate["epsB"])}
                            for layer, rate in rates.items()},
                  "time": time.time()}
        self._write(record)
        self._scalars(step, {**_tagged("train", record["costs"]),
                             "speed/train_images_per_sec": record["images_per_sec"],
                             "speed/data_wait_sec": data_wait,
                             **_rate_tags(record["rates"])})

    def test_event(self, epoch, batchnum, *, step, costs, averages, cases, seconds):
        """costs: this event's test costs; averages: those of the Averages section."""
        record = {"event": "test", "epoch": epoch, "batchnum": batchnum, "step": step,
                  "cases": cases, "costs": _costs(costs), "averages": _costs(averages),
                  "seconds": seconds, "images_per_sec": _per_second(cases, seconds),
                  "time": time.time()}
        self._write(record)
        self._scalars(step, {**_tagged("test", record["costs"]),
                             **_tagged("test_average", record["averages"]),
                             "speed/test_images_per_sec": record["images_per_sec"]})

    def _write(self, record):
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as e:
            # Losing the log must not stop a run that can still train and save checkpoints.
            print(f"warning: cannot append to {self.path} ({e.strerror}); the metrics log "
                  f"stops here", file=sys.stderr, flush=True)
            self.path = None

    def _scalars(self, step, values):
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()


def _finite(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _costs(costs):
    return {name: [_finite(v) for v in values] for name, values in costs}


def _per_second(cases, seconds):
    return cases / seconds if seconds > 0 else None


def _tagged(prefix, costs):
    """TensorBoard tags such as `train/logprob_0` (its tags admit no brackets)."""
    return {f"{prefix}/{name}_{i}": v for name, values in costs.items()
            for i, v in enumerate(values)}


def _rate_tags(rates):
    tags = {}
    for layer, rate in rates.items():
        tags.update({f"lr/{layer}.epsW_{i}": r for i, r in enumerate(rate["epsW"])})
        tags[f"lr/{layer}.epsB"] = rate["epsB"]
    return tags
