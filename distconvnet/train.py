"""The training loop (spec §7), top to bottom.

One printed step is one *data batch*: it holds many SGD updates, one per `--mini` slice. Costs
accumulate on the device and are read once per data batch, so no minibatch waits for the host.
"""

import gc
import math
import time

import torch

from . import report
from .errors import OptionError, TrainingDiverged
from .evaluate import run_test


def train(session):
    """Train until the last batch of `--epochs`; test, report and save every `--test-freq`
    batches and after the last one."""
    console, opts = session.console, session.opts
    if opts.testing_freq < 1:
        raise OptionError(f"--test-freq {opts.testing_freq}: expected a positive number of "
                          f"training batches between tests")
    while not session.finished():
        waiting = time.perf_counter()
        batch = session.train_data.get_next_batch()
        session.report_data_warnings(session.train_data)
        progress = session.progress(batch.epoch, batch.batchnum)
        session.optimizer.set_progress(progress)
        started = time.perf_counter()
        console.write(report.batch_prefix(batch.epoch, batch.batchnum, progress))

        sums, cases = session.sum_over_ranks(*train_on_batch(session, batch))
        session.report_data_warnings(session.train_step)
        if opts.conserve_mem and session.device.type == "cuda":
            # Autograd already frees each minibatch's activations after backward; what stays is
            # the caching allocator's hold on them. Handing it back lets other processes on the
            # GPU use it, at the cost of fresh allocations next batch (spec's "slower").
            torch.cuda.empty_cache()
        costs = session.record_train(batch.epoch, batch.batchnum, sums, cases)
        console.write(report.cost_line(costs))
        session.metrics.train_batch(
            batch.epoch, batch.batchnum, step=session.batches_done(), progress=progress,
            costs=costs, cases=cases, seconds=time.perf_counter() - waiting,
            data_wait=started - waiting, rates=session.optimizer.current_rates())
        check_finite(console, costs)

        # The last batch is always a test event, so a finished run leaves its final weights
        # tested and saved (the original saved only every --test-freq batches: spec §11.2).
        tested = session.batches_done() % opts.testing_freq == 0 or session.finished()
        if tested:
            test_and_save(session)
        # The batch's wall time (spec §9.2), its data's wait included as in the original, whose
        # timed loop loaded the next batch; a test event's includes the test, so it gets no
        # images/s figure.
        seconds = time.perf_counter() - waiting
        console.line(report.seconds_suffix(seconds, None if tested else cases))
        if tested or session.batches_done() == session.batches_at_start + 1:
            settle_heap()


def settle_heap():
    """After the first batch (which compiled the net) and after a test event (which may have
    compiled its test graphs), what is alive lives for the whole run: frozen out of the
    collector's sight, it no longer makes each full collection take a third of a second
    (BENCHMARKS.md, 2026-12-04)."""
    gc.collect()
    gc.freeze()


def train_on_batch(session, batch):
    """Forward, backward and update for each minibatch; returns device-side cost sums."""
    session.model.train()
    schedule = session.pass_schedule
    if schedule is not None:
        return train_passes(session, batch, schedule)
    sums = {}
    for mats in session.minibatches(batch):
        for name, values in session.train_step(mats).items():
            sums[name] = values if name not in sums else sums[name] + values
    return sums, batch.mats[0].shape[0]


def train_passes(session, batch, schedule):
    """The same for nets that run the pass schedule of spec §8 (hybrid or model parallel):
    each minibatch is several forward/backward passes, updates included."""
    sums = {}
    for mats, cases in zip(session.minibatches(batch), session.minibatch_sizes(batch)):
        costs = schedule.train_minibatch(mats, session.optimizer, session.autocast, cases)
        for name, values in costs.items():
            sums[name] = values if name not in sums else sums[name] + values
    return schedule.folded_costs(sums), batch.mats[0].shape[0]


def test_and_save(session):
    """A test event: the test block, the weight statistics, a checkpoint (spec §7)."""
    console = session.console
    started = time.perf_counter()
    if session.pass_schedule is not None:
        # Ranks train only the layers they hold; the test runs the whole net on every rank, and
        # the statistics and checkpoint read it all, so every copy is made current here, the
        # only time training needs it (not per batch).
        session.pass_schedule.share_weights(session.optimizer)
    sums, cases = run_test(session, session.test_batches_for_event())
    costs = session.record_test(sums, cases)
    averages = session.test_averages()
    session.metrics.test_event(session.epoch, session.batchnum, step=session.batches_done(),
                               costs=costs, averages=averages, cases=cases,
                               seconds=time.perf_counter() - started)
    console.write(report.test_block(costs, averages))
    # Not in the original: weights that test to NaN/Inf are not saved over the last good ones.
    check_finite(console, costs, "test cost")
    console.write(report.weight_block(session.weight_stats()))
    session.save()
    console.write(report.saved_block(session.run_dir))


def check_finite(console, costs, what="cost"):
    """The original's only divergence guard: a NaN/Inf first cost value stops training."""
    for name, values in costs:
        if values and not math.isfinite(values[0]):
            console.line(report.nan_suffix())
            raise TrainingDiverged(f"{what} '{name}' is {values[0]}; stopped, and the last "
                                   f"checkpoint is kept")
