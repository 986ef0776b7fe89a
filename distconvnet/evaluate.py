"""Test passes: the test event, --test-only, --multiview-test averaging, --write-features,
--test-out."""

import os
import time

import numpy as np
import torch

from . import report, safepickle
from .errors import OptionError
from .fileio import atomic_write
from .history import raw_sums
from .optim import weight_stats


def eval_minibatch(opts):
    """Test minibatches: --mini, or 256 cases if that is more (no update waits for them)."""
    return max(opts.minibatch_size, 256)


def test_batches(run, one):
    """The test batches of a test event: with `one` (--test-one 1), the next one, cycling;
    else the whole test range."""
    for _ in range(1 if one else len(run.opts.test_batch_range)):
        batch = run.test_data.get_next_batch()
        report_warnings(run.console, run.strategy.rank, run.test_data)
        yield batch


def report_warnings(console, rank, source):
    """What a provider or a step handled on its own (bad images replaced, a shape that trains
    without a CUDA graph), on stderr, from any rank."""
    for text in source.take_warnings():
        console.warn(rank, f"warning: {text}")


def run_test(model, strategy, autocast, batches, minibatch, keep=(), on_batch=None):
    """Evaluate `batches` (DataBatch objects) without dropout, `minibatch` cases at a time;
    returns (cost sums over all ranks, cases).

    `on_batch(batch, sums, cases, seconds, acts)` is called after each batch (test-only lines,
    feature files); `acts` holds the (view-averaged) outputs of the `keep` layers.
    """
    model.eval()
    total, total_cases = {}, 0
    with torch.no_grad():
        for batch in batches:
            started = time.perf_counter()
            sums, cases, acts = _evaluate_batch(model, autocast, batch, minibatch, keep)
            sums, cases = strategy.sum_over_ranks(sums, cases)
            for name, values in sums.items():
                total[name] = values if name not in total else total[name] + values
            total_cases += cases
            if on_batch is not None:
                on_batch(batch, sums, cases, time.perf_counter() - started, acts)
    return total, total_cases


def _evaluate_batch(model, autocast, batch, minibatch, keep):
    """One test batch, minibatch by minibatch; multiview averages probabilities before costs."""
    views = batch.num_views
    cases = batch.mats[0].shape[0] // views
    sums, acts = {}, {name: [] for name in keep}
    for start in range(0, cases, minibatch):
        stop = min(start + minibatch, cases)
        if views == 1:
            mats = [m[start:stop] for m in batch.mats]
            with autocast():
                out = model(mats, keep=keep)
            costs = out.costs
            kept = out.acts
        else:
            costs, kept = _multiview_costs(model, autocast, batch.mats, views, cases, start,
                                           stop, keep)
        for name, values in costs.items():
            values = values.float()
            sums[name] = values if name not in sums else sums[name] + values
        for name in keep:
            acts[name].append(kept[name].float().flatten(1))
    # A rank's shard of a short test batch may be empty: it still hands on rows of the right
    # width, so that gathering the ranks' rows needs no special case.
    device = batch.mats[0].device
    return sums, cases, {name: torch.cat(rows) if rows else
                         torch.zeros((0, model.layers[name].outputs), device=device)
                         for name, rows in acts.items()}


def _multiview_costs(model, autocast, mats, views, cases, start, stop, keep):
    """Average each cost's input probabilities over the views, then cost them once (spec §6.3).

    Labels are tiled over the views, so the first view's label inputs serve for all.
    """
    costs_layers = model.cost_layers()
    averaged = sorted({c.probs_input for c in costs_layers} | set(keep))
    labels = sorted({c.input_names[0] for c in costs_layers})
    summed, label_acts = {}, {}
    for v in range(views):
        rows = slice(v * cases + start, v * cases + stop)
        with autocast():
            out = model([m[rows] for m in mats], keep=averaged + (labels if v == 0 else []))
        for name in averaged:
            act = out.acts[name].float()
            summed[name] = act if name not in summed else summed[name] + act
        if v == 0:
            label_acts = {name: out.acts[name] for name in labels}
    costs = {layer.name: layer.cost_from_probs(label_acts[layer.input_names[0]],
                                               summed[layer.probs_input] / views)
             for layer in costs_layers}
    return model.fold_children(costs), {k: summed[k] / views for k in keep}


def test_only(run):
    """--test-only 1: every test batch, one line each, then the whole set's costs (spec §9.2)."""
    console, opts, model, history = run.console, run.opts, run.model, run.history
    keep = [opts.write_features] if opts.write_features else []
    if opts.write_features:
        check_feature_layer(model, opts.write_features)
    if opts.test_out:
        probs = check_logreg_layer(model, opts.logreg_name).probs_input
        keep = sorted(set(keep) | {probs})

    def on_batch(batch, sums, cases, seconds, acts):
        if opts.write_features:
            write_feature_file(run, batch, acts[opts.write_features])
        if opts.test_out:
            write_predictions_file(run, batch, acts[probs])
        console.line(report.test_only_batch_line(batch.batchnum, raw_sums(sums), cases,
                                                 seconds))
        console.line(report.test_only_batch_costs(history.printed(sums, cases)))

    sums, cases = run_test(model, run.strategy, run.autocast, test_batches(run, one=False),
                           eval_minibatch(opts), keep, on_batch)
    console.write(report.test_only_block(history.printed(sums, cases),
                                         weight_stats(model.weight_layers(), run.optimizer)))
    if opts.write_features:
        write_feature_meta(run, model.layers[opts.write_features].outputs)
    if opts.force_save:
        run.checkpointer.save(run)
        console.line(report.saved_block(run.checkpointer.run_dir))


def check_feature_layer(model, name):
    """Features come from a layer with outputs: not a cost, and one the net has."""
    layer = model.layers[name] if name in model.layers else None
    if layer is None or layer.is_cost:
        usable = ", ".join(n for n, other in model.layers.items() if not other.is_cost)
        problem = "is a cost layer" if layer is not None else "is not a layer of this net"
        raise OptionError(f"--write-features {name}: '{name}' {problem} (layers with outputs: "
                          f"{usable})")


def check_logreg_layer(model, name):
    """--logreg-name must name a cost.logreg layer: its probabilities are what --test-out
    writes. Returns the layer."""
    layer = model.layers[name] if name in model.layers else None
    if layer is None or layer.type_name != "cost.logreg":
        logregs = ", ".join(n for n, other in model.layers.items()
                            if other.type_name == "cost.logreg")
        raise OptionError(f"--logreg-name {name}: '{name}' is not a cost.logreg layer of this "
                          f"net (cost.logreg layers: {logregs or 'none'})")
    return layer


def write_predictions_file(run, batch, probs):
    """`<test-out>/test_preds_<N>`: {'data': (cases, classes) float32 probabilities averaged
    over the views, 'note': 'generated from <checkpoint>'} (spec §12.2; the original's copy was
    commented out and wrote zeros). With several ranks, rank 0 gathers and writes."""
    gathered = run.strategy.gather_rows([probs], run.opts.minibatch_size)
    if gathered is None:
        return
    os.makedirs(run.opts.test_out, exist_ok=True)
    path = os.path.join(run.opts.test_out, f"test_preds_{batch.batchnum}")
    payload = {"data": gathered[0].cpu().numpy().astype(np.float32),
               "note": f"generated from {run.plan.state['path']}"}
    atomic_write(path, safepickle.dumps(payload))


def write_feature_file(run, batch, features):
    """`<feature-path>/data_batch_<N>`: {'data': (cases, outputs) float32, 'labels': (1, cases)}.
    With several ranks, rank 0 gathers the rows of all shards in the batch's order and writes."""
    cases = features.shape[0]
    gathered = run.strategy.gather_rows([features, batch.mats[1][:cases].float()],
                                        run.opts.minibatch_size)
    if gathered is None:
        return
    features, labels = gathered
    os.makedirs(run.opts.feature_path, exist_ok=True)
    path = os.path.join(run.opts.feature_path, f"data_batch_{batch.batchnum}")
    payload = {"data": features.cpu().numpy().astype(np.float32),
               "labels": labels.reshape(1, -1).cpu().numpy()}
    atomic_write(path, safepickle.dumps(payload))
    run.console.line(report.wrote_feature_line(path))


def write_feature_meta(run, num_vis):
    if not run.strategy.is_master:
        return
    meta = {"source_model": run.opts.load_file, "num_vis": num_vis,
            "batch_size": run.test_data.batch_meta.get(
                "batch_size", run.test_data.batch_meta.get("num_cases_per_batch"))}
    atomic_write(os.path.join(run.opts.feature_path, "batches.meta"), safepickle.dumps(meta))
