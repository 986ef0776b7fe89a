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
  * What each rank does on each pass is arithmetic on the plan, worked out once (RankProgram
    in plan.py), and what depends on the minibatch's case count (rows, slices, buffer sizes)
    once per count (`_Program`); a minibatch then only walks the result. Every rank walks the
    same steps, so each point-to-point transfer happens at the same step on both ends:
      - forward: *segments* — consecutive layers a rank runs on a pass, walked by one backward
        root, with nothing to receive between them (a segment ends at a cut layer or cost and
        before a layer that reads rows from another rank) — run as one call; a layer's output
        goes to the ranks that read it right after the layer runs;
      - backward, in rounds: each gradient return goes back as soon as the roots that read
        its rows on the receiving rank have run, and each root (a cost or a cut layer) runs as
        soon as its gradient is complete, so no rank waits for more of another's work than
        the data require.
  * Transfers: all of one step go out in one batch_isend_irecv (one NCCL group); a receiver
    waits (work.wait(), which on NCCL only makes the current stream wait) only when it first
    reads what came in, and sends are waited on at the end of the minibatch. Nothing is read
    back to the host: the receiver sizes each buffer from what both ends can work out, the
    rows from the plan's microbatch arithmetic and the per-row shape, dtype and memory format
    from a header sent once per layer, pair of ranks and autocast setting.
  * After each pass: gradients of the weight groups due for an update are summed over exactly
    the ranks that hold the layer, one all-reduce per rank set over a flat buffer, then
    Ccn2SGD.step() applies each group when its updatePeriod_eff completes, scaling by
    1/(period · mini/numPasses).
  * With compile_layers (--compile; auto: CUDA only), each segment runs through torch.compile
    as one function (fusing across its layers); the cuts, transfers and the pass walk stay in
    Python between segments.

Each process builds the whole net (the cfg's geometry needs every layer) and keeps one Ccn2SGD
over all of it, so checkpoints and resumes see one complete optimizer; it trains only the layers
it holds (`freeze_remote_layers`), so its copies of the others go stale while it trains:
`share_weights` brings them up to date, weights and momentum, and the trainer calls it only
before a test event (which tests, prints weight statistics and saves), never per batch.
"""

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import fastpath
from .plan import Post, RankProgram


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


class _Batch:
    """The works of one batch_isend_irecv, waited on once: by the first reader of what it
    received, or at the end of the minibatch. Its ops hold the tensors they send (often
    copies no one else holds) until then."""

    __slots__ = ("works", "ops")

    def __init__(self, works, ops):
        self.works, self.ops = works, ops

    def wait(self):
        for work in self.works:
            work.wait()
        self.works = self.ops = ()


@dataclass
class _Run:
    """A segment as one minibatch size runs it."""

    call: object        # the segment's function, compiled or not
    gathers: list       # how to build each argument (see PassSchedule._gathered)
    outputs: list       # (layer, {replica: rows} or None for a cost, whether it is cut)


@dataclass
class _Send:
    """A Post as one minibatch size runs it: each transfer with its rows."""

    moves: list         # (Transfer, rows)


@dataclass
class _Round:
    """A Round as one minibatch size runs it."""

    returns: list       # (Transfer, rows)
    roots: tuple


class _Program:
    """Everything one minibatch of `cases` cases needs that is arithmetic on the plan and this
    rank: shard, data exchange, and per pass the forward steps and backward rounds, with every
    row count and slice worked out. Built on the first minibatch of that size and kept."""

    def __init__(self, schedule, cases):
        program, placement = schedule.program, schedule.placement
        self.shard = -(-cases // placement.world_size)
        self.shard_start = min(schedule.rank * self.shard, cases)
        self.slices = [placement.microbatch_slices(cases, g)
                       for g in range(placement.data_groups)]
        self._schedule = schedule
        self._row_ranges = {}     # output_rows, by (layer, pass)
        self.data_moves = self._data_moves()
        self.forward = [[self._step(step, p) for step in steps]
                        for p, steps in enumerate(program.forward)]
        self.backward = [[_Round([(t, self.rows(t.layer, t.replica, t.computed_pass))
                                  for t in r.returns], r.roots) for r in rounds]
                         for rounds in program.backward]

    def rows(self, name, replica, pass_idx):
        schedule = self._schedule
        return schedule.program.rows(self.slices[schedule.group], name, replica, pass_idx)

    def output_rows(self, name, pass_idx):
        """{replica: (start, stop)} of this rank's replicas of `name`, computed on `pass_idx`,
        in their batched output."""
        key = (name, pass_idx)
        if key not in self._row_ranges:
            rows, start = {}, 0
            for replica in self._schedule.local[name]:
                count = self.rows(name, replica, pass_idx)
                rows[replica] = (start, start + count)
                start += count
            self._row_ranges[key] = rows
        return self._row_ranges[key]

    def _step(self, step, pass_idx):
        schedule = self._schedule
        if isinstance(step, Post):
            return _Send([(t, self.rows(t.layer, t.replica, t.computed_pass))
                          for t in step.transfers])
        outputs = []
        for index in step.outputs:
            name = step.layers[index]
            rows = None if schedule.model.layers[name].is_cost else \
                self.output_rows(name, pass_idx)
            outputs.append((name, rows, name in schedule.cuts))
        return _Run(schedule.calls[_call_key(step)],
                    [self._gather(read, pass_idx) for read in step.reads], outputs)

    def _gather(self, read, pass_idx):
        """How to build what a segment reads:
          ("view", data layer, start, stop): rows of this rank's own shard;
          ("pieces", data layer, microbatches): microbatches gathered at the start;
          ("whole", layer): this rank's output of the layer, as it is;
          ("parts", [("chunk", layer, start, stop) | ("received", (layer, replica))]): rows of
          this rank's output and of received ones, concatenated in this order."""
        schedule, name = self._schedule, read.layer
        if schedule.model.layers[name].is_data:
            bounds = [self.slices[schedule.group][i] for i in read.sources]
            start, stop = bounds[0][0], bounds[-1][1]
            contiguous = all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            if contiguous and self.shard_start <= start and \
                    stop <= self.shard_start + self.shard:
                # this rank's own shard: a view, and for one process the minibatch as it came
                return ("view", name, start - self.shard_start, stop - self.shard_start)
            return ("pieces", name, read.sources)
        computed = pass_idx - pass_idx % schedule.plan.active_pass_period[name]
        if read.sources == schedule.local[name]:
            return ("whole", name)
        rows = self.output_rows(name, computed)
        return ("parts", [("chunk", name, *rows[s]) if s in rows else ("received", (name, s))
                          for s in read.sources])

    def _data_moves(self):
        """The data exchange at the start of a minibatch, in the order every rank walks it:
        ("send", data layer, start, stop, rank) of this rank's shard; ("local", key, start,
        stop) and ("recv", key, rows, rank) of the pieces of key = (data layer, microbatch)."""
        schedule, moves = self._schedule, []
        shard, shard_start = self.shard, self.shard_start
        for name, needs in schedule.data_needs.items():
            for rank in sorted(needs):
                for index in sorted(needs[rank]):
                    start, stop = self.slices[schedule.placement.group_of(rank)][index]
                    for owner in range(start // shard, -(-stop // shard)):
                        lo, hi = max(start, owner * shard), min(stop, (owner + 1) * shard)
                        if owner == schedule.rank and rank == schedule.rank:
                            moves.append(("local", (name, index), lo - shard_start,
                                          hi - shard_start))
                        elif owner == schedule.rank:
                            moves.append(("send", name, lo - shard_start, hi - shard_start,
                                          rank))
                        elif rank == schedule.rank:
                            moves.append(("recv", (name, index), hi - lo, owner))
        return moves


class PassSchedule:
    """One net, one plan, one rank: trains minibatches with the pass semantics of spec §8."""

    def __init__(self, model, plan, world_size=1, rank=0, compile_layers=False):
        self.model, self.plan = model, plan
        self.placement = plan.placement(world_size)
        self.rank, self.distributed = rank, world_size > 1
        self.group = self.placement.group_of(rank)
        self.inputs = {name: list(layer.input_names) + ([model.logits_for[name]]
                                                        if name in model.logits_for else [])
                       for name, layer in model.layers.items()}
        self.local = {name: self.placement.local_replicas(name, rank) for name in plan.order}
        self.program = RankProgram(self.placement, self.inputs, rank)
        self.cuts = self.program.cuts
        self.data_needs = self.placement.data_needs(self.inputs)
        self.holders = {name: self.placement.holders(name) for name in plan.order}
        self.rank_sets = self.placement.rank_sets()
        # What runs each segment: its function, or that function compiled.
        segments = {_call_key(step): step for steps in self.program.forward for step in steps
                    if not isinstance(step, Post)}
        self.calls = {key: fastpath.forward_fn(self._segment_function(segment), compile_layers)
                      for key, segment in segments.items()}
        if compile_layers:
            _make_room_for_compiled_segments()
        self._programs = {}       # {cases: _Program}
        self._rank_groups = {}
        self._cost_lengths = None
        self._layouts = {}        # {(layer, src, dst, autocast): layout} learnt from headers
        self._step = []

    def _segment_function(self, segment):
        """One function that runs the segment's layers over its reads and returns the outputs
        used after it (a cost's as (objective, values)), written out as straight-line code:
        torch.compile can then split the graph at a layer it cannot trace (a graph break in a
        loop would make it give up on the whole segment), and each segment has a code object
        of its own, on which torch.compile keeps its compiled entries (one shared by every
        segment would make each call look through all of theirs)."""
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

    # -- one minibatch -------------------------------------------------------------------------
    def train_minibatch(self, mats, optimizer, autocast=contextlib.nullcontext, cases=None):
        """All passes of one minibatch: forward, backward, gradient sum and update per pass.

        `mats` holds this rank's shard of the minibatch: with W ranks, rank k holds rows
        [k·⌈cases/W⌉, (k+1)·⌈cases/W⌉) of its `cases` rows (providers/batches.shard_indices);
        one process holds them all. Returns this rank's cost sums {cost layer: values}, children
        not folded, on the device; `folded_costs` of them, summed over ranks, are the
        minibatch's.
        """
        cases = mats[0].shape[0] if cases is None else cases
        if cases not in self._programs:
            self._programs[cases] = _Program(self, cases)
        program = self._programs[cases]
        self._begin_minibatch(mats, program)
        sums = {}
        for pass_idx in range(self.plan.num_passes):
            with autocast():
                costs = self._forward_pass(program.forward[pass_idx])
            self._backward_pass(program.backward[pass_idx])
            self._sum_due_gradients(optimizer)
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
        self.batches = []
        self.data = {name: layer(mats) for name, layer in self.model.layers.items()
                     if layer.is_data}
        self._exchange_data(program.data_moves)

    def _end_minibatch(self):
        for batch in self.batches:
            batch.wait()
        self.outputs = self.received = self.waits = self.objectives = self.incoming = None
        self.data = self.data_parts = self.data_pieces = self.layouts = self.batches = None

    def _exchange_data(self, moves):
        """Fetch the pieces of the microbatches this rank's layers read from the ranks whose
        shards hold them, in one batch. A piece's rows are arithmetic and its per-row shape
        and dtype are those of this rank's own shard, so no header is needed."""
        parts = {}
        for move in moves:
            if move[0] == "send":
                _, name, start, stop, rank = move
                self._post(dist.isend, self.data[name][start:stop].contiguous(), rank)
            elif move[0] == "recv":
                _, (name, index), rows, owner = move
                local = self.data[name]
                parts.setdefault((name, index), []).append(self._post(
                    dist.irecv, local.new_empty((rows,) + local.shape[1:]), owner))
            else:
                _, (name, index), start, stop = move
                parts.setdefault((name, index), []).append(self.data[name][start:stop])
        batch = self._flush()
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
            if isinstance(step, _Send):
                self._send_outputs(step.moves)
                continue
            results = step.call(*[self._gathered(spec) for spec in step.gathers])
            for (name, rows, is_cut), result in zip(step.outputs, results):
                if rows is None:
                    objective, values = result
                    if objective.requires_grad:
                        self.objectives[name] = objective
                    costs[name] = values
                else:
                    self.outputs[name] = _Output(result, rows, is_cut)
        return costs

    def _gathered(self, spec):
        kind = spec[0]
        if kind == "whole":
            return self.outputs[spec[1]].value
        if kind == "view":
            _, name, start, stop = spec
            return self.data[name][start:stop]
        if kind == "pieces":
            _, name, indices = spec
            pieces = [self._data_piece(name, i) for i in indices]
        else:
            pieces = [self.outputs[part[1]].value[part[2]:part[3]] if part[0] == "chunk"
                      else self._received(part[1]) for part in spec[1]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _send_outputs(self, moves):
        """Post one layer's transfers: its rows to the ranks that read them, or what this rank
        reads of them into new leaves, waited on when first read."""
        layouts = self._agree_layouts([t for t, _ in moves])
        received = []
        for (t, rows), layout in zip(moves, layouts):
            self.layouts[t] = layout
            if self.rank == t.src:
                sent = _laid_out(self.outputs[t.layer].chunk(t.replica).detach(), layout, rows)
                self._post(dist.isend, sent, t.dst)
            else:
                value = _empty(layout, rows, self.device)
                self.received[(t.layer, t.replica)] = self._post(dist.irecv, value, t.src)
                received.append((t.layer, t.replica))
        batch = self._flush()
        for key in received:
            self.waits[key] = batch

    def _agree_layouts(self, transfers):
        """The per-row shape, dtype and memory format each transfer's receiver allocates.
        The first transfer of a layer between two ranks under one autocast setting sends them
        ahead in a header, read once on the host; later ones reuse what both ends kept."""
        kind = self.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        keys = [(t.layer, t.src, t.dst, autocast) for t in transfers]
        headers = {}
        for t, key in zip(transfers, keys):
            if key in self._layouts or key in headers:
                continue
            if self.rank == t.src:
                layout = _layout_of(self.outputs[t.layer].chunk(t.replica))
                self._layouts[key] = layout
                self._post(dist.isend, _encode_layout(layout, self.device), t.dst)
            else:
                headers[key] = self._post(dist.irecv, torch.empty(
                    _HEADER, dtype=torch.int64, device=self.device), t.src)
        batch = self._flush()
        if headers:
            batch.wait()
        for key, header in headers.items():
            self._layouts[key] = _decode_layout(header.tolist())
        return [self._layouts[key] for key in keys]

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
            _run_backward(roots)

    def _return_gradients(self, returns):
        """Send each received leaf's gradient back to the rank that computed its rows, all of
        this step in one batch; what comes back is added when its layer's root runs."""
        incoming = []
        for t, rows in returns:
            layout = self.layouts[t]
            if self.rank == t.dst:
                leaf = self.received.pop((t.layer, t.replica))
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self._post(dist.isend, _laid_out(grad, layout, rows), t.src)
            else:
                grad = _empty(layout, rows, self.device)
                incoming.append((t, self._post(dist.irecv, grad, t.dst)))
        batch = self._flush()
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

    # -- gradient sums and weights across ranks ------------------------------------------------
    @torch.no_grad()
    def _sum_due_gradients(self, optimizer):
        """Sum, over the ranks holding each layer, the gradients of the groups due for an update
        now (the original summed replica gradients before its sharded update, spec §8): one
        all-reduce per rank set (and dtype), over a flat buffer whose views become the
        gradients."""
        if not self.distributed:
            return
        buckets = {}
        for group in optimizer.param_groups:
            param = group["params"][0]
            holders = self.holders[group["layer"]]
            if len(holders) > 1 and self.local[group["layer"]] and \
                    optimizer.state[param]["pending"] + 1 >= group["update_period"]:
                buckets.setdefault(holders, {}).setdefault(param.dtype, []).extend(
                    [param, *optimizer.receivers(param)])
        for holders in self.rank_sets:
            for params in buckets.get(holders, {}).values():
                flat, views = _flat_views(params)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                torch._foreach_copy_(views, grads)
                dist.all_reduce(flat, group=self._rank_groups[holders])
                for view, param in zip(views, params):
                    param.grad = view

    def create_process_groups(self):
        """Create the rank-set groups; every rank must call this, in the same order."""
        if not self.distributed:
            return
        world = tuple(range(self.placement.world_size))
        for holders in self.rank_sets:
            self._rank_groups[holders] = None if holders == world else dist.new_group(
                list(holders))

    def freeze_remote_layers(self, optimizer):
        """Leave the layers this rank does not hold to their holders: a group whose base rate is
        0 is skipped by Ccn2SGD (not learned, not decayed). Call after building or refreshing
        the optimizer."""
        for group in optimizer.param_groups:
            if not self.local[group["layer"]]:
                group["base_lr"] = 0.0

    @torch.no_grad()
    def share_weights(self, optimizer):
        """Give every rank the current weights and momentum increments of every layer, from the
        first rank that holds it: before a test, a save or anything else that reads the whole
        net (not per batch: training reads only the layers a rank holds). One broadcast per
        owning rank (and dtype); layers every rank holds are equal already. Every rank must
        call this."""
        if not self.distributed:
            return
        buckets = {}
        for group in optimizer.param_groups:
            param = group["params"][0]
            holders = self.holders[group["layer"]]
            if len(holders) < self.placement.world_size:
                buckets.setdefault((holders[0], param.dtype), []).extend(
                    [param, *optimizer.receivers(param), optimizer.increment(param)])
        for (owner, _), tensors in buckets.items():
            flat, views = _flat_views(tensors)
            if self.rank == owner:
                torch._foreach_copy_(views, tensors)
            dist.broadcast(flat, src=owner)
            if self.rank != owner:
                torch._foreach_copy_(tensors, views)

    # -- point to point ------------------------------------------------------------------------
    def _post(self, op, tensor, peer):
        """Add a send or receive to this step's batch (an empty tensor moves nothing: both
        ends know its size). Returns the tensor."""
        if tensor.numel():
            self._step.append(dist.P2POp(op, tensor, peer))
        return tensor

    def _flush(self):
        """Post this step's batch; returns it (None if it moves nothing) to be waited on by
        whoever reads what it received, and in any case at the end of the minibatch."""
        ops, self._step = self._step, []
        if not ops:
            return None
        batch = _Batch(dist.batch_isend_irecv(ops), ops)
        self.batches.append(batch)
        return batch


# The element types and memory formats a transfer may carry, by index in its header.
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
           torch.int32, torch.uint8, torch.bool]
_FORMATS = [torch.contiguous_format, torch.channels_last]
_HEADER = 8     # int64s: dtype, memory format, number of per-row dims, the dims


def _layout_of(tensor):
    """(per-row shape, dtype, memory format) of a tensor about to be sent: channels_last stays
    channels_last, so neither end converts it."""
    channels_last = tensor.dim() == 4 and not tensor.is_contiguous() and \
        tensor.is_contiguous(memory_format=torch.channels_last)
    return (tuple(tensor.shape[1:]), tensor.dtype,
            torch.channels_last if channels_last else torch.contiguous_format)


def _encode_layout(layout, device):
    shape, dtype, memory_format = layout
    values = [_DTYPES.index(dtype), _FORMATS.index(memory_format), len(shape), *shape]
    return torch.tensor(values + [0] * (_HEADER - len(values)), dtype=torch.int64, device=device)


def _decode_layout(values):
    dtype, memory_format, ndim, *shape = values
    return tuple(shape[:ndim]), _DTYPES[dtype], _FORMATS[memory_format]


def _laid_out(tensor, layout, rows):
    """`tensor` in the layout its receiver allocated; any other size would corrupt or hang the
    transfer, so a mismatch (a bug in the schedule's arithmetic) stops here."""
    shape, dtype, memory_format = layout
    if tuple(tensor.shape) != (rows, *shape) or tensor.dtype != dtype:
        raise RuntimeError(f"internal error: sending {tuple(tensor.shape)} {tensor.dtype} where "
                           f"the receiver expects {(rows, *shape)} {dtype}")
    return tensor.contiguous(memory_format=memory_format)


def _empty(layout, rows, device):
    shape, dtype, memory_format = layout
    return torch.empty((rows, *shape), dtype=dtype, device=device, memory_format=memory_format)


def _flat_views(tensors):
    """One flat buffer and, for each tensor, a view of its piece with the tensor's shape and
    strides (channels_last stays channels_last): a bucket then moves in one collective."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype,
                       device=tensors[0].device)
    views, offset = [], 0
    for t in tensors:
        strides = torch.empty_like(t, device="meta").stride()
        views.append(flat.as_strided(t.shape, strides, offset))
        offset += t.numel()
    return flat, views


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


def _call_key(segment):
    """What a segment's function depends on: segments of different passes that run the same
    layers the same way share it (and its compiled entries), wherever their rows come from."""
    return segment.layers, segment.args, segment.outputs


def _run_backward(roots):
    """One backward call for the roots of a round (their upstream graphs are disjoint)."""
    if roots:
        torch.autograd.backward([t for t, _ in roots], [g for _, g in roots])
