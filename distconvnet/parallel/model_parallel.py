"""Model, hybrid and data parallelism from `gpu=` (spec §8), applied around an unchanged model.py.

`PassSchedule` trains one minibatch the way cuda-convnet2 did, on one process or SPMD (one
process per GPU index):

  * Forward, pass by pass: a layer runs on the passes its activePassPeriod allows; its replica r
    reads the input replica the plan names (Plan.feeding_replica); data replica d delivers the
    microbatch Plan.data_microbatch names. The replicas one process runs are batched into one
    call, in replica order, so a data-parallel net runs exactly the plain forward.
  * The graph is cut at the outputs of *cut layers* (Placement.cut_layers): those whose
    consumers have fewer replicas (wide → narrow), or run on another process, or lead to
    several backward roots. Consumers read a detached leaf; the leaf's gradient
    accumulates over the passes; the layer runs backward once, on the last pass of its period,
    with that accumulated gradient — the original's "wide layers accumulate the gradient from
    the passes above, then run backward once".
  * What each rank does on each pass is arithmetic on the plan, worked out once
    (program.RankProgram), and what depends on the minibatch's case count (rows, slices,
    buffer sizes) once per count (minibatch.MinibatchProgram): typed steps (steps.py) that a
    minibatch then only walks, with `match`. Every rank walks the same steps, so each
    point-to-point transfer (p2p.py) happens at the same step on both ends:
      - forward: *segments* — consecutive layers a rank runs on a pass, walked by one backward
        root, with nothing to receive between them (a segment ends at a cut layer or cost and
        before a layer that reads rows from another rank) — run as one call; a layer's output
        goes to the ranks that read it right after the layer runs;
      - backward, in rounds (backward.py): each gradient return goes back as soon as the roots
        that read its rows on the receiving rank have run, and each root (a cost or a cut
        layer) runs as soon as its gradient is complete.
  * After each pass: gradients of the matrices due for an update are summed over exactly the
    ranks that hold the layer (holders.py), then Ccn2SGD.step() applies each group when its
    updatePeriod_eff completes, scaling by 1/(period · mini/numPasses).
  * With compile_layers (--compile; auto: CUDA only), each segment runs through torch.compile
    as one function (fusing across its layers); the cuts, transfers and the pass walk stay in
    Python between segments.
"""

import contextlib
import re

import torch
import torch.distributed as dist

from .. import fastpath
from . import p2p
from .holders import Holders
from .minibatch import MinibatchProgram, call_key
from .program import RankProgram
from .steps import (Joined, KeepRows, Pieces, ReceiveRows, Received, Rows, RunSegment, Segment,
                    SendOutputs, SendRows, Whole)


class _Output:
    """A layer's output on this rank: its local replicas' rows, batched in replica order."""

    __slots__ = ("tensor", "value", "rows")

    def __init__(self, tensor, rows, is_cut):
        self.tensor = tensor
        self.value = tensor.detach().requires_grad_() if is_cut and tensor.requires_grad \
            else tensor
        self.rows = rows          # {replica: (start, stop)} in self.value

    def chunk(self, replica):
        start, stop = self.rows[replica]
        return self.value[start:stop]


class PassSchedule:
    """One net, one plan, one rank: trains minibatches with the pass semantics of spec §8."""

    def __init__(self, model, plan, world_size=1, rank=0, compile_layers=False):
        self.model, self.plan = model, plan
        self.placement = plan.placement(world_size)
        self.rank, self.distributed = rank, world_size > 1
        self.program = RankProgram(self.placement, model.reads(), rank)
        self.holders = Holders(self.placement, rank)
        self.local = self.holders.local
        # What runs each segment: its function, or that function compiled.
        segments = {call_key(step): step for steps in self.program.forward for step in steps
                    if isinstance(step, Segment)}
        self.calls = {key: fastpath.forward_fn(self._segment_function(segment), compile_layers)
                      for key, segment in segments.items()}
        if compile_layers:
            _make_room_for_compiled_segments()
        self._programs = {}       # {cases: MinibatchProgram}
        self._cost_lengths = None
        self._layouts = {}        # {(layer, src, dst, autocast): layout} learnt from headers
        self.exchange = p2p.Exchange()

    def _segment_function(self, segment):
        """One function that runs the segment's layers over its reads and returns the outputs
        used after it (a cost's as (objective, values)), written out as straight-line code and
        exec'd: torch.compile can then split the graph at a layer it cannot trace, where a
        graph break inside a loop over the layers would make it give up on the whole segment,
        and each segment has a code object of its own, on which torch.compile keeps its
        compiled entries (one shared by every segment would make each call look through all
        of theirs)."""
        name = re.sub(r"\W", "_", f"segment_{segment.layers[0]}_to_{segment.layers[-1]}")
        reads = [f"r{i}" for i in range(len(segment.reads))]
        values = reads + [f"a{i}" for i in range(len(segment.layers))]
        lines = [f"def {name}({', '.join(reads)}):"]
        for i, (layer_name, args) in enumerate(zip(segment.layers, segment.args)):
            xs = [values[k] for k in args]
            positional = len(self.model.layers[layer_name].input_names)
            logits = [f"logits={x}" for x in xs[positional:]]
            lines.append(f"    a{i} = layers[{i}]({', '.join(xs[:positional] + logits)})")
        lines.append(f"    return ({''.join(f'a{i}, ' for i in segment.outputs)})")
        namespace = {"layers": [self.model.layers[n] for n in segment.layers]}
        exec("\n".join(lines), namespace)
        return namespace[name]

    # -- the rank groups (holders.py) ----------------------------------------------------------
    def create_process_groups(self):
        self.holders.create_process_groups()

    def freeze_remote_layers(self, optimizer):
        self.holders.freeze_remote(optimizer)

    def share_weights(self, optimizer):
        self.holders.share_weights(optimizer)

    # -- one minibatch -------------------------------------------------------------------------
    def train_minibatch(self, mats, optimizer, autocast=contextlib.nullcontext, cases=None):
        """All passes of one minibatch: forward, backward, gradient sum and update per pass.

        `mats` holds this rank's shard of the minibatch of `cases` rows (sharding.py); one
        process holds them all. Returns this rank's cost sums {cost layer: values}, children
        not folded, on the device; `folded_costs` of them, summed over ranks, are the
        minibatch's.
        """
        cases = mats[0].shape[0] if cases is None else cases
        if cases not in self._programs:
            self._programs[cases] = MinibatchProgram(self.program, self.calls, cases)
        program = self._programs[cases]
        self._begin_minibatch(mats, program)
        sums = {}
        for pass_idx in range(self.plan.num_passes):
            with autocast():
                costs = self._forward_pass(program.forward[pass_idx])
            self._backward_pass(program.backward[pass_idx])
            self.holders.sum_due_gradients(optimizer)
            optimizer.step()
            for name, values in costs.items():
                values = values.detach().float()
                sums[name] = values if name not in sums else sums[name] + values
        self._end_minibatch()
        return sums

    def folded_costs(self, sums):
        """This rank's cost sums with every cost of the net present (zeros for those it does
        not run) and children folded into their parents: summed over ranks, the printed sums."""
        costs = self.model.cost_layers()
        if self._cost_lengths is None:
            # Once per run: which costs run where does not change.
            lengths = torch.tensor([len(sums[c.name]) if c.name in sums else 0 for c in costs],
                                   dtype=torch.int64, device=self.device)
            if self.distributed:
                dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
            self._cost_lengths = lengths.tolist()
        whole = {c.name: sums[c.name] if c.name in sums else
                 torch.zeros(n, device=self.device)
                 for c, n in zip(costs, self._cost_lengths)}
        return self.model.fold_children(whole)

    def _begin_minibatch(self, mats, program):
        self.device = mats[0].device
        self.outputs, self.objectives = {}, {}
        self.received, self.waits = {}, {}   # leaves received, and the batches they are in
        self.incoming = {}        # {cut layer: [(batch, replica, gradient)]} not yet added
        self.layouts = {}         # {Transfer: layout} of this minibatch's transfers
        self.data = {name: layer(mats) for name, layer in self.model.layers.items()
                     if layer.is_data}
        self._exchange_data(program.data_moves)

    def _end_minibatch(self):
        self.exchange.wait_all()
        self.outputs = self.received = self.waits = self.objectives = self.incoming = None
        self.data = self.data_parts = self.data_pieces = self.layouts = None

    def _exchange_data(self, moves):
        """Fetch the pieces of the microbatches this rank's layers read from the ranks whose
        shards hold them, in one batch. A piece's rows are arithmetic and its per-row shape
        and dtype are those of this rank's own shard, so no header is needed."""
        parts = {}
        for move in moves:
            match move:
                case SendRows(layer, start, stop, rank):
                    self.exchange.post(dist.isend, self.data[layer][start:stop].contiguous(),
                                       rank)
                case ReceiveRows(layer, microbatch, rows, rank):
                    local = self.data[layer]
                    parts.setdefault((layer, microbatch), []).append(self.exchange.post(
                        dist.irecv, local.new_empty((rows,) + local.shape[1:]), rank))
                case KeepRows(layer, microbatch, start, stop):
                    parts.setdefault((layer, microbatch), []).append(
                        self.data[layer][start:stop])
        batch = self.exchange.flush()
        self.data_parts = {key: (pieces, batch) for key, pieces in parts.items()}
        self.data_pieces = {}

    def _data_piece(self, name, index):
        """This group's rows of microbatch `index` of data layer `name`, waited for and
        concatenated when first read."""
        key = (name, index)
        if key not in self.data_pieces:
            pieces, batch = self.data_parts.pop(key, ([], None))
            if batch is not None:
                batch.wait()
            self.data_pieces[key] = pieces[0] if len(pieces) == 1 else \
                torch.cat(pieces) if pieces else self.data[name][:0]
        return self.data_pieces[key]

    def _received(self, key):
        """A received leaf, waited for when first read."""
        leaf = self.received[key]
        if key in self.waits:
            batch = self.waits.pop(key)
            if batch is not None:
                batch.wait()
            leaf.requires_grad_(leaf.is_floating_point())
        return leaf

    # -- forward -------------------------------------------------------------------------------
    def _forward_pass(self, steps):
        costs = {}
        for step in steps:
            match step:
                case SendOutputs(moves):
                    self._send_outputs(moves)
                case RunSegment(call, reads, outputs):
                    results = call(*[self._read(read) for read in reads])
                    for output, result in zip(outputs, results):
                        if output.rows is None:
                            objective, values = result
                            if objective.requires_grad:
                                self.objectives[output.layer] = objective
                            costs[output.layer] = values
                        else:
                            self.outputs[output.layer] = _Output(result, output.rows,
                                                                 output.is_cut)
        return costs

    def _read(self, read):
        """What a segment reads (steps.py), as a tensor."""
        match read:
            case Whole(layer):
                return self.outputs[layer].value
            case Rows(layer, start, stop) if layer in self.data:
                return self.data[layer][start:stop]
            case Rows(layer, start, stop):
                return self.outputs[layer].value[start:stop]
            case Received(layer, replica):
                return self._received((layer, replica))
            case Pieces(layer, microbatches):
                pieces = [self._data_piece(layer, i) for i in microbatches]
            case Joined(parts):
                pieces = [self._read(part) for part in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _send_outputs(self, moves):
        """Post one layer's transfers: its rows to the ranks that read them, or what this rank
        reads of them into new leaves, waited on when first read."""
        layouts = p2p.agree_layouts(self.exchange, self._layouts, [t for t, _ in moves],
                                    self.rank, self.device,
                                    lambda t: self.outputs[t.layer].chunk(t.replica))
        received = []
        for (t, rows), layout in zip(moves, layouts):
            self.layouts[t] = layout
            if self.rank == t.src:
                sent = p2p.laid_out(self.outputs[t.layer].chunk(t.replica).detach(), layout,
                                    rows)
                self.exchange.post(dist.isend, sent, t.dst)
            else:
                value = p2p.empty(layout, rows, self.device)
                self.received[(t.layer, t.replica)] = self.exchange.post(dist.irecv, value,
                                                                         t.src)
                received.append((t.layer, t.replica))
        batch = self.exchange.flush()
        for key in received:
            self.waits[key] = batch

    # -- backward ------------------------------------------------------------------------------
    def _backward_pass(self, rounds):
        for step in rounds:
            self._return_gradients(step.returns)
            roots = []
            for name in step.roots:
                if name in self.objectives:
                    roots.append((self.objectives.pop(name), None))
                elif name in self.outputs:
                    out = self.outputs[name]
                    self._add_incoming(name, out)
                    if out.value is not out.tensor and out.value.grad is not None:
                        roots.append((out.tensor, out.value.grad))
            if roots:      # one call: the roots' upstream graphs are disjoint
                torch.autograd.backward([t for t, _ in roots], [g for _, g in roots])

    def _return_gradients(self, returns):
        """Send each received leaf's gradient back to the rank that computed its rows, all of
        this step in one batch; what comes back is added when its layer's root runs."""
        incoming = []
        for t, rows in returns:
            layout = self.layouts[t]
            if self.rank == t.dst:
                leaf = self.received.pop((t.layer, t.replica))
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self.exchange.post(dist.isend, p2p.laid_out(grad, layout, rows), t.src)
            else:
                grad = p2p.empty(layout, rows, self.device)
                incoming.append((t, self.exchange.post(dist.irecv, grad, t.dst)))
        batch = self.exchange.flush()
        for t, grad in incoming:
            self.incoming.setdefault(t.layer, []).append((batch, t.replica, grad))

    def _add_incoming(self, name, out):
        for batch, replica, grad in self.incoming.pop(name, ()):
            if batch is not None:
                batch.wait()
            if out.value is out.tensor:
                continue                     # no graph above: nothing to propagate
            if out.value.grad is None:
                out.value.grad = torch.zeros_like(out.value)
            start, stop = out.rows[replica]
            out.value.grad[start:stop] += grad


# Compiled entries one segment may need: one per input size it meets (the full microbatches,
# those of a short last minibatch, and the 1- and 0-row ones that dynamo specialises).
_ENTRIES_PER_SEGMENT = 4


def _make_room_for_compiled_segments():
    """dynamo keeps at most recompile_limit compiled entries per code object (8 by default;
    beyond it a segment quietly runs uncompiled); each segment has a code object of its own
    and needs up to _ENTRIES_PER_SEGMENT of them."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _ENTRIES_PER_SEGMENT))
