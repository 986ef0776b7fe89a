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
from .evaluate import eval_minibatch, report_warnings, run_test, test_batches
from .optim import weight_stats


def train(run):
    """Train until the last batch of `--epochs`; test, report and save every `--test-freq`
    batches and after the last one."""
    console, opts, position, strategy = run.console, run.opts, run.position, run.strategy
    if opts.testing_freq < 1:
        raise OptionError(f"--test-freq {opts.testing_freq}: expected a positive number of "
                          f"training batches between tests")
    while not position.finished():
        waiting = time.perf_counter()
        batch = run.train_data.get_next_batch()
        report_warnings(console, strategy.rank, run.train_data)
        progress = position.progress(batch.epoch, batch.batchnum)
        run.optimizer.set_progress(progress)
        started = time.perf_counter()
        console.write(report.batch_prefix(batch.epoch, batch.batchnum, progress))

        sums, cases = strategy.sum_over_ranks(*train_on_batch(
            run.model, strategy, batch, run.train_data.num_cases(batch.batchnum),
            opts.minibatch_size))
        report_warnings(console, strategy.rank, strategy)
        if opts.conserve_mem and run.device.type == "cuda":
            # Autograd already frees each minibatch's activations after backward; what stays is
            # the caching allocator's hold on them. Handing it back lets other processes on the
            # GPU use it, at the cost of fresh allocations next batch (spec's "slower").
            torch.cuda.empty_cache()
        position.trained(batch.epoch, batch.batchnum, run.train_data.cursor)
        costs = run.history.record_train(sums, cases)
        console.write(report.cost_line(costs))
        run.metrics.train_batch(
            batch.epoch, batch.batchnum, step=position.batches_done(), progress=progress,
            costs=costs, cases=cases, seconds=time.perf_counter() - waiting,
            data_wait=started - waiting, rates=run.optimizer.current_rates())
        check_finite(console, costs)

        # The last batch is always a test event, so a finished run leaves its final weights
        # tested and saved (the original saved only every --test-freq batches: spec §11.2).
        tested = position.batches_done() % opts.testing_freq == 0 or position.finished()
        if tested:
            test_and_save(run)
        # The batch's wall time (spec §9.2), its data's wait included as in the original, whose
        # timed loop loaded the next batch; a test event's includes the test, so it gets no
        # images/s figure.
        seconds = time.perf_counter() - waiting
        console.line(report.seconds_suffix(seconds, None if tested else cases))
        if tested or position.batches_done() == run.batches_at_start + 1:
            settle_heap()


def settle_heap():
    """After the first batch (which compiled the net) and after a test event (which may have
    compiled its test graphs), what is alive lives for the whole run: frozen out of the
    collector's sight, it no longer makes each full collection take a third of a second
    (BENCHMARKS.md, 2026-12-04)."""
    gc.collect()
    gc.freeze()


def train_on_batch(model, strategy, batch, whole_cases, minibatch):
    """Forward, backward and update for each minibatch of a data batch of `whole_cases` cases
    (over all ranks); returns this rank's device-side cost sums and cases."""
    model.train()
    sums = {}
    for mats, cases in strategy.minibatches(batch, whole_cases, minibatch):
        for name, values in strategy.train_minibatch(mats, cases).items():
            sums[name] = values if name not in sums else sums[name] + values
    return strategy.batch_costs(sums), batch.mats[0].shape[0]


def test_and_save(run):
    """A test event: the test block, the weight statistics, a checkpoint (spec §7)."""
    console, position = run.console, run.position
    started = time.perf_counter()
    run.strategy.before_test()
    sums, cases = run_test(run.model, run.strategy, run.autocast,
                           test_batches(run, one=bool(run.opts.test_one)), eval_minibatch(run.opts))
    costs = run.history.record_test(sums, cases)
    averages = run.history.test_averages()
    run.metrics.test_event(position.epoch, position.batchnum, step=position.batches_done(),
                           costs=costs, averages=averages, cases=cases,
                           seconds=time.perf_counter() - started)
    console.write(report.test_block(costs, averages))
    # Not in the original: weights that test to NaN/Inf are not saved over the last good ones.
    check_finite(console, costs, "test cost")
    console.write(report.weight_block(weight_stats(run.model.weight_layers(), run.optimizer)))
    run.checkpointer.save(run)
    console.write(report.saved_block(run.checkpointer.run_dir))


def check_finite(console, costs, what="cost"):
    """The original's only divergence guard: a NaN/Inf first cost value stops training."""
    for name, values in costs:
        if values and not math.isfinite(values[0]):
            console.line(report.nan_suffix())
            raise TrainingDiverged(f"{what} '{name}' is {values[0]}; stopped, and the last "
                                   f"checkpoint is kept")
