"""Data-parallel training behind one small interface: what the Session asks of "the ranks".

Every rank holds the whole net and takes its shard of every minibatch (the providers cut it:
providers/batches.shard_indices), so N ranks with --mini M make the same updates as one
process with --mini M, as the original's `gpu=0,1` replicas did (spec §8).

Gradients. The update needs Σ over all cases of ∂E/∂W (E sums over cases; optim.py divides by
--mini), so the ranks' gradients must be summed. Each rank backpropagates N × its objective and
the engines average: mean_r(N·g_r) = Σ_r g_r. Averaging rather than summing, because gradients
that accumulate over several passes (updatePeriod) are all-reduced again with every backward
(DDP reduces the whole .grad): the part already reduced is equal on every rank, and averaging
leaves it as it is, where summing would multiply it by N. For N a power of two the scaling and
the division are exact.

Engines:
  DDP (default; NCCL on CUDA, gloo on the CPU): bucketed all-reduce overlapped with backward.
  MPI (--dist-backend mpi, under mpirun): one flat buffer all-reduced with mpi4py right before
      each update, straight from GPU memory when the MPI is CUDA-aware, else through pinned host
      memory. Set DISTCONVNET_MPI_CUDA_AWARE=1 or 0 where mpi4py cannot tell.

A rank whose shard of a minibatch is empty (a short last minibatch) still joins the all-reduce:
it runs the net on one zero case and backpropagates zero times its objective.

Per data batch the ranks talk only where they must: every rank knows the whole batch's case
count (its provider sharded it), so the minibatch pieces are arithmetic, and the cost sums and
cases of all ranks travel in one float64 all-reduce when the batch ends, so the printed numbers
are the single-process ones up to float32 rounding of the per-rank sums. Which costs there are
and how long each is, the layout of that all-reduce, is agreed once per run: a rank whose test
shard is empty has no sums of its own and contributes zeros.
"""

import math
import os
import warnings

import torch

from ..errors import OptionError
from ..providers.batches import shard_indices
from .launch import DistributedError, init_distributed, teardown

CUDA_AWARE_VAR = "DISTCONVNET_MPI_CUDA_AWARE"


def shard_sizes(num_cases, minibatch, rank, world_size):
    """How many cases of each minibatch slice of a batch `rank` holds, in order: the lengths of
    the pieces that shard_indices concatenates (a piece may be empty)."""
    sizes = []
    for start in range(0, num_cases, minibatch):
        length = min(minibatch, num_cases - start)
        part = math.ceil(length / world_size)
        sizes.append(min((rank + 1) * part, length) - min(rank * part, length))
    return sizes


def cost_layout(sums):
    """[(cost name, number of values)] of a rank's cost sums."""
    return [(name, values.numel()) for name, values in sums.items()]


def merged_layouts(layouts):
    """One layout from every rank's: each cost once, in the order the ranks first name it. Only
    a rank with no cases (an empty test shard) has none, so all others agree."""
    lengths = {}
    for rank, layout in enumerate(layouts):
        for name, length in layout:
            if lengths.setdefault(name, length) != length:
                raise DistributedError(f"rank {rank} has {length} values of cost '{name}', "
                                       f"another rank {lengths[name]}")
    return list(lengths.items())


def pack_costs(sums, cases, layout, device, rank):
    """This rank's sums in `layout` (zeros for costs it has none of) and its cases, as one
    float64 vector on `device`; float64 holds a case count exactly."""
    unknown = {name: values.numel() for name, values in sums.items()}.items() - set(layout)
    if unknown:
        name, length = sorted(unknown)[0]
        raise DistributedError(f"rank {rank}'s cost '{name}' ({length} values) is not in the "
                               f"run's cost layout {layout}")
    parts = [sums[name].detach().to(device, torch.float64).flatten() if name in sums
             else torch.zeros(length, dtype=torch.float64, device=device)
             for name, length in layout]
    return torch.cat(parts + [torch.tensor([cases], dtype=torch.float64, device=device)])


def make_sync(info, backend, device):
    """The sync for this job: nothing to do for one process, else DDP or MPI (`--dist-backend`:
    auto = nccl on CUDA, gloo on the CPU)."""
    if info.world_size == 1:
        return SingleProcess()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise OptionError("--dist-backend nccl needs CUDA devices; use gloo on the CPU")
    if backend == "mpi":
        if info.launcher != "mpirun":
            raise OptionError(f"--dist-backend mpi: start the ranks with mpirun (this job was "
                              f"started by {info.launcher})")
        return MpiSync(info, device)
    return DdpSync(info, backend, device)


class SingleProcess:
    """One process: every call is the identity, so single-GPU runs take the plain path."""

    rank, world_size, is_master = 0, 1, True

    def wrap(self, model):
        return model

    def forward_fn(self, forward):
        return forward

    def attach(self, optimizer):
        pass

    def shard_sizes(self, num_cases, minibatch):
        return shard_sizes(num_cases, minibatch, 0, 1)

    def sum_over_ranks(self, sums, cases):
        return sums, cases

    def broadcast(self, value):
        return value

    def all_gather(self, value):
        return [value]

    def gather_rows(self, tensors, minibatch):
        return tensors

    def close(self):
        pass


class _Ranks:
    """What every multi-rank sync shares; engines supply the collectives and wrap()."""

    def __init__(self, info, device):
        self.rank, self.world_size = info.rank, info.world_size
        self.is_master = info.rank == 0
        self.device = device
        self.cost_layout = None         # [(cost name, number of values)], agreed on first use

    def forward_fn(self, forward):
        """The forward the trainer runs: objective × N for the averaging engines, and a stand-in
        for an empty shard so that this rank still takes part in the gradient all-reduce."""
        scale = self.world_size

        def run(mats):
            if mats[0].shape[0] > 0:
                out = forward(mats)
                return out._replace(objective=out.objective * scale)
            stand_in = [torch.zeros((1,) + m.shape[1:], dtype=m.dtype, device=m.device)
                        for m in mats]
            out = forward(stand_in)
            return out._replace(objective=out.objective * 0,
                                costs={name: v * 0 for name, v in out.costs.items()})
        return run

    def attach(self, optimizer):
        pass

    def shard_sizes(self, num_cases, minibatch):
        """This rank's piece of every minibatch of a batch of `num_cases` cases (the whole
        batch's, which every rank knows); all ranks get as many pieces."""
        return shard_sizes(num_cases, minibatch, self.rank, self.world_size)

    def sum_over_ranks(self, sums, cases):
        """({cost name: float64 sums over all ranks, on the host}, all ranks' cases), from one
        all-reduce of this rank's sums and cases packed in the run's cost layout."""
        if self.cost_layout is None:
            self.cost_layout = merged_layouts(self.all_gather(cost_layout(sums)))
        totals = self.sum_on_every_rank(pack_costs(sums, cases, self.cost_layout, self.device,
                                                   self.rank))
        values = totals[:-1].split([length for _, length in self.cost_layout])
        return {name: v for (name, _), v in zip(self.cost_layout, values)}, int(totals[-1])

    def gather_rows(self, tensors, minibatch):
        """Rows of a sharded test batch (features, labels...), back in the batch's order on
        rank 0; None on the other ranks."""
        parts = self.gather([t.detach().cpu() for t in tensors])
        if not self.is_master:
            return None
        num_cases = sum(part[0].shape[0] for part in parts)
        whole = [torch.empty((num_cases,) + t.shape[1:], dtype=t.dtype) for t in parts[0]]
        for rank, part in enumerate(parts):
            rows = torch.from_numpy(shard_indices(num_cases, minibatch, rank, self.world_size))
            if len(rows) != part[0].shape[0]:
                raise DistributedError(f"rank {rank} sent {part[0].shape[0]} rows where its "
                                       f"shard of {num_cases} cases has {len(rows)}")
            for target, t in zip(whole, part):
                target[rows] = t
        return whole


class DdpSync(_Ranks):
    """torch DistributedDataParallel over gloo or NCCL; object collectives via torch too."""

    def __init__(self, info, backend, device):
        super().__init__(info, device)
        init_distributed(info, backend, device)

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel
        # The local layer's weight gradient comes out with another (equally valid) stride on
        # a size-1 dim than DDP's bucket view; DDP copies it, correctly, but would warn.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        # Our buffers are constants every rank builds alike from the cfg (pooling window
        # counts, blur taps): broadcasting them before every forward, DDP's default, would add
        # a collective per minibatch. torch 2.13 renamed the switch (forward_sync_buffers) and
        # warns on the old name, the only one older torch (2.11 on our GPUs) knows.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
        # Gradients as views of the buckets save a copy per step; DDP broadcasts rank 0's
        # weights here, so all ranks start equal.
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True, broadcast_buffers=False)

    def sum_on_every_rank(self, values):
        import torch.distributed as dist
        dist.all_reduce(values)
        return values.cpu()

    def broadcast(self, value):
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value):
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def gather(self, value):
        import torch.distributed as dist
        out = [None] * self.world_size if self.is_master else None
        dist.gather_object(value, out, dst=0)
        return out

    def close(self):
        teardown()


class MpiSync(_Ranks):
    """Gradients all-reduced by mpi4py in one flat float32 buffer before each update."""

    def __init__(self, info, device):
        super().__init__(info, device)
        from mpi4py import MPI
        self.mpi, self.comm = MPI, MPI.COMM_WORLD
        if self.comm.Get_size() != info.world_size:
            raise DistributedError(f"MPI sees {self.comm.Get_size()} ranks, the launcher "
                                   f"{info.world_size}")
        self.params, self.flat, self.views, self.host = [], None, [], None

    def wrap(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise DistributedError("--dist-backend mpi all-reduces float32 weights only")
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        self.views = [v.view_as(p) for v, p in
                      zip(self.flat.split([p.numel() for p in self.params]), self.params)]
        staged = self.device.type == "cuda" and not _cuda_aware(self.mpi)
        if staged:
            self.host = torch.empty(self.flat.shape, dtype=torch.float32, pin_memory=True)
        with torch.no_grad():          # rank 0's initial weights everywhere, as DDP does
            for view, p in zip(self.views, self.params):
                view.copy_(p)
            self._collective(self.comm.Bcast)
            for view, p in zip(self.views, self.params):
                p.copy_(view)
        return model

    def attach(self, optimizer):
        optimizer.register_step_pre_hook(lambda *_: self._allreduce_grads())

    @torch.no_grad()
    def _allreduce_grads(self):
        for view, p in zip(self.views, self.params):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
        self._collective(lambda buf: self.comm.Allreduce(self.mpi.IN_PLACE, buf,
                                                         op=self.mpi.SUM))
        self.flat.div_(self.world_size)
        for view, p in zip(self.views, self.params):
            if p.grad is not None:
                p.grad.copy_(view)

    def _collective(self, call):
        """Run an in-place MPI call on the flat buffer: on the device, or staged on the host."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if self.host is not None:
            self.host.copy_(self.flat)
            call([self.host.numpy(), self.mpi.FLOAT])
            self.flat.copy_(self.host)
        elif self.device.type == "cuda":
            call([self.flat, self.mpi.FLOAT])
        else:
            call([self.flat.numpy(), self.mpi.FLOAT])

    def sum_on_every_rank(self, values):
        """On the host: a few numbers, needed there anyway."""
        host = values.cpu().numpy()
        self.comm.Allreduce(self.mpi.IN_PLACE, [host, self.mpi.DOUBLE], op=self.mpi.SUM)
        return torch.from_numpy(host)

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def all_gather(self, value):
        return self.comm.allgather(value)

    def gather(self, value):
        return self.comm.gather(value, root=0)

    def close(self):
        teardown()


def _cuda_aware(mpi):
    if os.environ.get(CUDA_AWARE_VAR) in ("0", "1"):
        return os.environ[CUDA_AWARE_VAR] == "1"
    query = getattr(mpi, "Query_cuda_support", None)
    return bool(query()) if query is not None else False
