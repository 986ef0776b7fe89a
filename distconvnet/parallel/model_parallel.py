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
  * Backward, per pass, visits layers in reverse file order: cost objectives and cut layers are
    the roots. Every process walks the same order, so each point-to-point transfer (a replica's
    rows forward, their gradient back) happens at the same step on both ends.
  * Transfers: all of one step go out in one batch_isend_irecv (one NCCL group), and the
    receiver waits with work.wait(), which on NCCL only makes the current stream wait. Nothing
    is read back to the host: the receiver sizes each buffer from what both ends can work out,
    the rows from the plan's microbatch arithmetic and the per-row shape, dtype and memory
    format from a header sent once per layer, pair of ranks and autocast setting.
  * After each pass: gradients of the weight groups due for an update are summed over exactly
    the ranks that hold the layer, one all-reduce per rank set over a flat buffer, then
    Ccn2SGD.step() applies each group when its updatePeriod_eff completes, scaling by
    1/(period · mini/numPasses).
  * With compile_layers (--compile; auto: CUDA only), each layer this rank holds runs through
    torch.compile on its own (fusing e.g. a layer's bias, neuron and dropout); the cuts,
    transfers and the pass walk stay in Python between compiled layers.

Each process builds the whole net (the cfg's geometry needs every layer) and keeps one Ccn2SGD
over all of it, so checkpoints and resumes see one complete optimizer; it trains only the layers
it holds (`freeze_remote_layers`), so its copies of the others go stale while it trains:
`share_weights` brings them up to date, weights and momentum, and the trainer calls it only
before a test event (which tests, prints weight statistics and saves), never per batch.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import fastpath


@dataclass
class _Transfer:
    """One replica's rows sent to another rank at a forward step; its gradient comes back."""

    layer: str
    replica: int
    src: int
    dst: int
    computed_pass: int   # the pass whose output of `layer` this is
    return_pass: int     # the pass on whose backward the gradient goes back
    layout: tuple = None  # (per-row shape, dtype, memory format), agreed by both ends


class _Output:
    """A layer's output on this rank: its local replicas' rows, batched in replica order."""

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
        self.group = self.placement.group_of(rank)
        self.inputs = {name: list(layer.input_names) + ([model.logits_for[name]]
                                                        if name in model.logits_for else [])
                       for name, layer in model.layers.items()}
        self.local = {name: self.placement.local_replicas(name, rank) for name in plan.order}
        self.cuts = self.placement.cut_layers(self.inputs, rank)
        self.data_needs = self.placement.data_needs(self.inputs)
        # What runs each layer this rank holds: the layer, or its compiled form.
        self.calls = {name: fastpath.forward_fn(layer, compile_layers)
                      for name, layer in model.layers.items()
                      if not layer.is_data and self.local[name]}
        if compile_layers:
            _make_room_for_compiled_layers(len(self.calls))
        self._rank_groups = {}
        self._cost_lengths = None
        self._layouts = {}        # {(layer, src, dst, autocast): layout} learnt from headers
        self._step, self.sends = [], []

    def _rank(self, name, replica):
        return self.placement.rank_of(self.plan.gpus[name][replica], self.group)

    # -- one minibatch -------------------------------------------------------------------------
    def train_minibatch(self, mats, optimizer, autocast=contextlib.nullcontext, cases=None):
        """All passes of one minibatch: forward, backward, gradient sum and update per pass.

        `mats` holds this rank's shard of the minibatch: with W ranks, rank k holds rows
        [k·⌈cases/W⌉, (k+1)·⌈cases/W⌉) of its `cases` rows (providers/batches.shard_indices);
        one process holds them all. Returns this rank's cost sums {cost layer: values}, children
        not folded, on the device; summed over ranks they are the minibatch's (`total_costs`).
        """
        self._begin_minibatch(mats, mats[0].shape[0] if cases is None else cases)
        sums = {}
        for pass_idx in range(self.plan.num_passes):
            with autocast():
                costs = self._forward_pass(pass_idx)
            self._backward_pass(pass_idx)
            self._finish_sends()
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
                                   dtype=torch.int64, device=self._device())
            if self.distributed:
                dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
            self._cost_lengths = lengths.tolist()
        whole = {c.name: sums[c.name] if c.name in sums else
                 torch.zeros(n, device=self._device())
                 for c, n in zip(costs, self._cost_lengths)}
        return self.model.fold_children(whole)

    def total_costs(self, sums):
        """The whole net's cost sums (over all ranks), children folded."""
        costs = self.folded_costs(sums)
        if self.distributed:
            flat = torch.cat(list(costs.values()))
            dist.all_reduce(flat)
            costs = dict(zip(costs, flat.split([len(v) for v in costs.values()])))
        return costs

    def _device(self):
        return next(iter(self.model.parameters())).device

    def _begin_minibatch(self, mats, cases):
        self.outputs, self.received, self.objectives = {}, {}, {}
        self.transfers = []
        self.shard = -(-cases // self.placement.world_size)
        self.shard_start = min(self.rank * self.shard, cases)
        self.data = {name: layer(mats) for name, layer in self.model.layers.items()
                     if layer.is_data}
        self.slices = [self._microbatch_slices(cases, g)
                       for g in range(self.placement.data_groups)]
        self.data_pieces = self._exchange_data()

    def _end_minibatch(self):
        self.outputs = self.received = self.objectives = self.data = self.data_pieces = None

    def _microbatch_slices(self, cases, group):
        """[start, stop) of each microbatch of data-parallel group `group`: part `group` of
        every microbatch of the whole minibatch, so that pass p over all groups sees exactly
        the cases one process would (spec §8 with W/G copies of the model group)."""
        groups = self.placement.data_groups
        out = []
        for index in range(self.plan.max_replicas):
            start, stop = self.plan.microbatch_bounds(cases, index)
            part = -(-(stop - start) // groups)
            out.append((min(start + group * part, stop), min(start + (group + 1) * part, stop)))
        return out

    def _rows(self, name, replica, pass_idx):
        """How many cases replica `replica` of `name` computes on pass `pass_idx` of this group:
        arithmetic every rank can do, so that a receiver sizes its buffer without a header."""
        plan = self.plan
        if self.model.layers[name].is_data:
            start, stop = self.slices[self.group][plan.data_microbatch(name, replica, pass_idx)]
            return stop - start
        inp = self.inputs[name][0]
        computed = pass_idx - pass_idx % plan.active_pass_period[inp]
        return self._rows(inp, plan.feeding_replica(name, inp, replica, pass_idx), computed)

    def _exchange_data(self):
        """{(data layer, microbatch): this group's rows of it} for the microbatches this rank's
        layers read, fetched piece by piece from the ranks whose shards hold them, in one
        batch. A piece's rows are arithmetic and its per-row shape and dtype are those of this
        rank's own shard, so no header is needed."""
        parts_of = {}
        for name, needs in self.data_needs.items():
            local = self.data[name]
            for rank in sorted(needs):
                for index in sorted(needs[rank]):
                    start, stop = self.slices[self.placement.group_of(rank)][index]
                    parts = []
                    for owner in range(start // self.shard, -(-stop // self.shard)):
                        lo = max(start, owner * self.shard)
                        hi = min(stop, (owner + 1) * self.shard)
                        if owner == self.rank:
                            piece = local[lo - self.shard_start:hi - self.shard_start]
                            if rank == self.rank:
                                parts.append(piece)
                            else:
                                self._post(dist.isend, piece.contiguous(), rank)
                        elif rank == self.rank:
                            parts.append(self._post(dist.irecv, local.new_empty(
                                (hi - lo,) + local.shape[1:]), owner))
                    if rank == self.rank:
                        parts_of[(name, index)] = parts
        self._flush()
        return {(name, index): parts[0] if len(parts) == 1 else
                torch.cat(parts) if parts else self.data[name][:0]
                for (name, index), parts in parts_of.items()}

    # -- forward -------------------------------------------------------------------------------
    def _forward_pass(self, pass_idx):
        costs = {}
        for name, layer in self.model.layers.items():
            if layer.is_data or not self.plan.runs_forward(name, pass_idx):
                continue
            self._exchange_inputs(name, pass_idx)
            mine = self.local[name]
            if not mine:
                continue
            xs, counts = zip(*[self._gather(name, inp, mine, pass_idx)
                               for inp in self.inputs[name]])
            if layer.is_cost:
                n = len(layer.input_names)
                kwargs = {"logits": xs[n]} if len(xs) > n else {}
                objective, values = self.calls[name](*xs[:n], **kwargs)
                if objective.requires_grad:
                    self.objectives[name] = objective
                costs[name] = values
                continue
            rows, start = {}, 0
            for replica, count in zip(mine, counts[0]):
                rows[replica] = (start, start + count)
                start += count
            self.outputs[name] = _Output(self.calls[name](*xs), rows, name in self.cuts)
        return costs

    def _gather(self, name, inp, mine, pass_idx):
        """The input rows of this rank's replicas of `name`, batched; and the rows per replica."""
        sources = [self.plan.feeding_replica(name, inp, r, pass_idx) for r in mine]
        if inp in self.data:
            return self._data_rows(inp, sources, pass_idx)
        out = self.outputs.get(inp)
        if out is not None and sources == list(out.rows):
            return out.value, [stop - start for start, stop in out.rows.values()]
        chunks = [out.chunk(s) if out is not None and s in out.rows else self.received[(inp, s)]
                  for s in sources]
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)), \
            [c.shape[0] for c in chunks]

    def _data_rows(self, name, replicas, pass_idx):
        indices = [self.plan.data_microbatch(name, r, pass_idx) for r in replicas]
        bounds = [self.slices[self.group][i] for i in indices]
        counts = [stop - start for start, stop in bounds]
        start, stop = bounds[0][0], bounds[-1][1]
        contiguous = all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
        if contiguous and self.shard_start <= start and stop <= self.shard_start + self.shard:
            # this rank's own shard: a view, and for one process the minibatch as it came
            local = self.data[name]
            return local[start - self.shard_start:stop - self.shard_start], counts
        pieces = [self.data_pieces[(name, i)] for i in indices]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), counts

    def _exchange_inputs(self, name, pass_idx):
        """Move every input replica that a replica of `name` reads on another rank there, all in
        one batch; each rank walks the same list, so both ends post at the same step."""
        period = self.plan.active_pass_period[name]
        moves = []
        for inp in self.inputs[name]:
            if inp in self.data:
                continue
            computed = pass_idx - pass_idx % self.plan.active_pass_period[inp]
            for replica in range(self.plan.replicas(name)):
                source = self.plan.feeding_replica(name, inp, replica, pass_idx)
                src, dst = self._rank(inp, source), self._rank(name, replica)
                key = (inp, source, dst, computed)
                if src == dst or any((t.layer, t.replica, t.dst, t.computed_pass) == key
                                     for t in self.transfers):
                    continue
                transfer = _Transfer(inp, source, src, dst, computed, pass_idx + period - 1)
                self.transfers.append(transfer)
                if self.rank in (src, dst):
                    moves.append(transfer)
        if not moves:
            return
        self._agree_layouts(moves)
        received = []
        for t in moves:
            rows = self._rows(t.layer, t.replica, t.computed_pass)
            if self.rank == t.src:
                sent = _laid_out(self.outputs[t.layer].chunk(t.replica).detach(), t.layout, rows)
                self._post(dist.isend, sent, t.dst)
            else:
                value = _empty(t.layout, rows, self._device())
                received.append((t, self._post(dist.irecv, value, t.src)))
        self._flush()
        for t, value in received:
            self.received[(t.layer, t.replica)] = value.requires_grad_(
                value.is_floating_point())

    def _agree_layouts(self, moves):
        """Give each transfer the per-row shape, dtype and memory format its receiver allocates.
        The first transfer of a layer between two ranks under one autocast setting sends them
        ahead in a header, read once on the host; later ones reuse what both ends kept."""
        kind = self._device().type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        headers = {}
        for t in moves:
            key = (t.layer, t.src, t.dst, autocast)
            if key in self._layouts or key in headers:
                continue
            if self.rank == t.src:
                layout = _layout_of(self.outputs[t.layer].chunk(t.replica))
                self._layouts[key] = layout
                self._post(dist.isend, _encode_layout(layout, self._device()), t.dst)
            else:
                headers[key] = self._post(dist.irecv, torch.empty(
                    _HEADER, dtype=torch.int64, device=self._device()), t.src)
        self._flush()
        for key, header in headers.items():
            self._layouts[key] = _decode_layout(header.tolist())
        for t in moves:
            t.layout = self._layouts[(t.layer, t.src, t.dst, autocast)]

    # -- backward ------------------------------------------------------------------------------
    def _backward_pass(self, pass_idx):
        roots = []
        for name in reversed(self.plan.order):
            layer = self.model.layers[name]
            if layer.is_cost:
                if self.plan.runs_backward(name, pass_idx) and name in self.objectives:
                    roots.append((self.objectives.pop(name), None))
                continue
            if name not in self.cuts:
                continue
            returns = [t for t in self.transfers if t.layer == name and t.return_pass == pass_idx]
            owns = name in self.outputs and self.plan.runs_backward(name, pass_idx)
            if not returns and not owns:
                continue
            _run_backward(roots)
            self._return_gradients(returns)
            out = self.outputs.get(name)
            if owns and out.value is not out.tensor and out.value.grad is not None:
                roots.append((out.tensor, out.value.grad))
        _run_backward(roots)

    def _return_gradients(self, returns):
        """Send each received leaf's gradient back to the rank that computed its rows, all of
        this step in one batch, and add what comes back into the cut output's gradient."""
        incoming = []
        for t in returns:
            if self.rank not in (t.src, t.dst):
                continue
            if self.rank == t.dst:
                leaf = self.received.pop((t.layer, t.replica))
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self._post(dist.isend, _laid_out(grad, t.layout, leaf.shape[0]), t.src)
            else:
                start, stop = self.outputs[t.layer].rows[t.replica]
                grad = _empty(t.layout, stop - start, self._device())
                incoming.append((t, self._post(dist.irecv, grad, t.dst)))
        self._flush()
        for t, grad in incoming:
            out = self.outputs[t.layer]
            if out.value is out.tensor:
                continue                     # no graph above: nothing to propagate
            if out.value.grad is None:
                out.value.grad = torch.zeros_like(out.value)
            start, stop = out.rows[t.replica]
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
            if not self.local[group["layer"]] or \
                    optimizer.state[param]["pending"] + 1 < group["update_period"]:
                continue
            holders = self.placement.holders(group["layer"])
            if len(holders) > 1:
                buckets.setdefault(holders, {}).setdefault(param.dtype, []).append(param)
        for holders in self.placement.rank_sets():
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
        for holders in self.placement.rank_sets():
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
            holders = self.placement.holders(group["layer"])
            if len(holders) < self.placement.world_size:
                buckets.setdefault((holders[0], param.dtype), []).extend(
                    [param, optimizer.increment(param)])
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
        """Post this step's batch. One that receives is waited on now (on NCCL: the current
        stream waits, the host does not); one that only sends is waited on after the pass."""
        ops, self._step = self._step, []
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if any(op.op is dist.irecv for op in ops):
            for work in works:
                work.wait()
        else:
            self.sends.append((works, ops))

    def _finish_sends(self):
        for works, _ in self.sends:
            for work in works:
                work.wait()
        self.sends = []


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


# Compiled entries one layer may need: one per input size it meets (the full microbatches, those
# of a short last minibatch, and the 1- and 0-row ones that dynamo specialises).
_ENTRIES_PER_LAYER = 4


def _make_room_for_compiled_layers(count):
    """Layers of one class share the compiled code of their forward, whose cache dynamo caps
    at recompile_limit entries (8) over all of them, one per weight shape and input size;
    beyond it a layer quietly runs uncompiled. Raise the cap to what `count` layers need."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _ENTRIES_PER_LAYER * count))


def _run_backward(roots):
    """One backward call for the roots collected so far (their upstream graphs are disjoint)."""
    if roots:
        tensors = [t for t, _ in roots]
        grads = [g for _, g in roots]
        torch.autograd.backward(tensors, grads)
        roots.clear()
