"""The training loop (spec §7), top to bottom.

One printed step is one *data batch*: it holds many SGD updates, one per `--mini` slice. Costs
accumulate on the device and are read once per data batch, so no minibatch waits for the host.
"""

import math
import time

from . import report
from .errors import TrainingDiverged
from .evaluate import run_test


def train(session):
    """Train until the last batch of `--epochs`; test, report and save every `--test-freq`."""
    console, opts = session.console, session.opts
    tested_last = False
    while not session.finished():
        batch = session.train_data.get_next_batch()
        progress = session.progress(batch.epoch, batch.batchnum)
        session.optimizer.set_progress(progress)
        started = time.perf_counter()
        console.write(report.batch_prefix(batch.epoch, batch.batchnum, progress))

        sums, cases = train_on_batch(session, batch)
        costs = session.record_train(batch.epoch, batch.batchnum, sums, cases)
        console.write(report.cost_line(costs))
        check_finite(console, costs)

        tested_last = session.batches_done() % opts.testing_freq == 0
        if tested_last:
            test_and_save(session)
        seconds = time.perf_counter() - started
        # A test event's time includes the test, so it gets no images/s figure.
        console.line(report.seconds_suffix(seconds, None if tested_last else cases))
    if not tested_last and session.batches_done() > session.batches_at_start:
        # A finished run always leaves its final weights saved (the original did not: spec §15).
        console.write(f"{session.epoch}.{session.batchnum}... final")
        test_and_save(session)
        console.line("")


def train_on_batch(session, batch):
    """Forward, backward and update for each minibatch; returns device-side cost sums."""
    model, optimizer = session.model, session.optimizer
    model.train()
    sums = {}
    for mats in session.minibatches(batch.mats):
        with session.autocast():
            out = model(mats)
        out.objective.backward()
        optimizer.step()
        for name, values in out.costs.items():
            values = values.detach().float()
            sums[name] = values if name not in sums else sums[name] + values
    return sums, batch.mats[0].shape[0]


def test_and_save(session):
    """A test event: the test block, the weight statistics, a checkpoint (spec §7)."""
    console = session.console
    sums, cases = run_test(session, session.test_batches_for_event())
    costs = session.record_test(sums, cases)
    console.write(report.test_block(costs, session.test_averages()))
    console.write(report.weight_block(session.weight_stats()))
    session.save()
    console.write(report.saved_block(session.run_dir))


def check_finite(console, costs):
    """The original's only divergence guard: a NaN/Inf first cost value stops training."""
    for name, values in costs:
        if values and not math.isfinite(values[0]):
            console.line(report.nan_suffix())
            raise TrainingDiverged(f"cost '{name}' is {values[0]}; stopped, and the last "
                                   f"checkpoint is kept")
