"""The pass schedule's point-to-point transfers: posted in batches, waited on late, sized by
both ends without reading anything back to the host.

All sends and receives of one step go out in one batch_isend_irecv (one NCCL group); a receiver
waits (work.wait(), which on NCCL only makes the current stream wait) only when it first reads
what came in, and sends are waited on at the end of the minibatch. The receiver sizes each
buffer from what both ends can work out: the rows from the plan's microbatch arithmetic, and
the per-row shape, dtype and memory format (the *layout*) from a header sent once per layer,
pair of ranks and autocast setting.
"""

import torch
import torch.distributed as dist

# The element types and memory formats a transfer may carry, by index in its header.
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
          torch.int32, torch.uint8, torch.bool]
FORMATS = [torch.contiguous_format, torch.channels_last]
HEADER = 8     # int64s: dtype, memory format, number of per-row dims, the dims


class Posted:
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


class Exchange:
    """The sends and receives of one step, then of the next: post() adds to the step, flush()
    posts it as one batch."""

    def __init__(self):
        self._step, self.batches = [], []

    def post(self, op, tensor, peer):
        """Add a send (dist.isend) or receive (dist.irecv) to this step's batch (an empty
        tensor moves nothing: both ends know its size). Returns the tensor."""
        if tensor.numel():
            self._step.append(dist.P2POp(op, tensor, peer))
        return tensor

    def flush(self):
        """Post this step's batch; returns it (None if it moves nothing) to be waited on by
        whoever reads what it received, and in any case by wait_all."""
        ops, self._step = self._step, []
        if not ops:
            return None
        batch = Posted(dist.batch_isend_irecv(ops), ops)
        self.batches.append(batch)
        return batch

    def wait_all(self):
        for batch in self.batches:
            batch.wait()
        self.batches = []


def layout_of(tensor):
    """(per-row shape, dtype, memory format) of a tensor about to be sent: channels_last stays
    channels_last, so neither end converts it."""
    channels_last = tensor.dim() == 4 and not tensor.is_contiguous() and \
        tensor.is_contiguous(memory_format=torch.channels_last)
    return (tuple(tensor.shape[1:]), tensor.dtype,
            torch.channels_last if channels_last else torch.contiguous_format)


def encode_layout(layout, device):
    shape, dtype, memory_format = layout
    values = [DTYPES.index(dtype), FORMATS.index(memory_format), len(shape), *shape]
    return torch.tensor(values + [0] * (HEADER - len(values)), dtype=torch.int64, device=device)


def decode_layout(values):
    dtype, memory_format, ndim, *shape = values
    return tuple(shape[:ndim]), DTYPES[dtype], FORMATS[memory_format]


def laid_out(tensor, layout, rows):
    """`tensor` in the layout its receiver allocated; any other size would corrupt or hang the
    transfer, so a mismatch (a bug in the schedule's arithmetic) stops here."""
    shape, dtype, memory_format = layout
    if tuple(tensor.shape) != (rows, *shape) or tensor.dtype != dtype:
        raise RuntimeError(f"internal error: sending {tuple(tensor.shape)} {tensor.dtype} where "
                           f"the receiver expects {(rows, *shape)} {dtype}")
    return tensor.contiguous(memory_format=memory_format)


def empty(layout, rows, device):
    shape, dtype, memory_format = layout
    return torch.empty((rows, *shape), dtype=dtype, device=device, memory_format=memory_format)


def agree_layouts(exchange, known, transfers, rank, device, sent_rows):
    """The layout each transfer's receiver allocates. The first transfer of a layer between two
    ranks under one autocast setting sends it ahead in a header, read once on the host; later
    ones reuse what both ends kept in `known` {(layer, src, dst, autocast): layout}.
    `sent_rows(transfer)`: the rows this rank sends."""
    kind = device.type
    autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
    keys = [(t.layer, t.src, t.dst, autocast) for t in transfers]
    headers = {}
    for t, key in zip(transfers, keys):
        if key in known or key in headers:
            continue
        if rank == t.src:
            layout = layout_of(sent_rows(t))
            known[key] = layout
            exchange.post(dist.isend, encode_layout(layout, device), t.dst)
        else:
            headers[key] = exchange.post(dist.irecv, torch.empty(
                HEADER, dtype=torch.int64, device=device), t.src)
    batch = exchange.flush()
    if headers:
        batch.wait()
    for key, header in headers.items():
        known[key] = decode_layout(header.tolist())
    return [known[key] for key in keys]


def flat_views(tensors):
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
