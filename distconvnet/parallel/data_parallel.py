"""Strategies: data parallelism over several processes, with DDP or with mpi4py.

Every rank holds the whole net and takes its shard of every minibatch (the providers cut it:
sharding.py), so N ranks with --mini M make the same updates as one process with --mini M, as
the original's `gpu=0,1` replicas did (spec §8).

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
      memory (ranks.MpiRanks.cuda_aware).

A rank whose shard of a minibatch is empty (a short last minibatch) still joins the all-reduce:
it runs the net on one zero case and backpropagates zero times its objective.

Per data batch the ranks talk only where they must: every rank knows the whole batch's case
count (its provider sharded it), so the minibatch pieces are arithmetic, and the cost sums and
cases of all ranks travel in one float64 all-reduce when the batch ends (strategy.Ranked), so
the printed numbers are the single-process ones up to float32 rounding of the per-rank sums.
"""

import warnings

import torch

from .. import fastpath
from .launch import DistributedError
from .ranks import MpiRanks
from .strategy import Ranked


def scaled_forward(forward, world_size):
    """The forward each rank runs: objective × N for the averaging engines, and a stand-in for
    an empty shard so that this rank still takes part in the gradient all-reduce."""
    def run(mats):
        if mats[0].shape[0] > 0:
            out = forward(mats)
            return out._replace(objective=out.objective * world_size)
        stand_in = [torch.zeros((1,) + m.shape[1:], dtype=m.dtype, device=m.device)
                    for m in mats]
        out = forward(stand_in)
        return out._replace(objective=out.objective * 0,
                            costs={name: v * 0 for name, v in out.costs.items()})
    return run


class _DataParallel(Ranked):
    """A net every rank holds whole, trained by an eager step over the wrapped forward."""

    @classmethod
    def fits(cls, plan, ranks):
        return ranks.world_size > 1

    def __init__(self, ranks, model, compile_model):
        super().__init__(ranks)
        self.forward = scaled_forward(fastpath.forward_fn(self.wrap(model), compile_model),
                                      self.world_size)
        self.step = None

    def attach(self, optimizer, autocast):
        self.step = fastpath.train_step(self.forward, optimizer, autocast, graphs=False)

    def train_minibatch(self, mats, cases):
        return self.step(mats)

    def drop_groups(self):
        self.forward = self.step = None


class DdpDataParallel(_DataParallel):
    """torch DistributedDataParallel over gloo or NCCL."""

    def __init__(self, ranks, plan, model, device, compile_model):
        super().__init__(ranks, model, compile_model)

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


class MpiDataParallel(_DataParallel):
    """Gradients all-reduced by mpi4py in one flat float32 buffer before each update."""

    @classmethod
    def fits(cls, plan, ranks):
        return isinstance(ranks, MpiRanks)

    def __init__(self, ranks, plan, model, device, compile_model):
        self.params, self.flat, self.views, self.host = [], None, [], None
        super().__init__(ranks, model, compile_model)

    def wrap(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise DistributedError("--dist-backend mpi all-reduces float32 weights only")
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        self.views = [v.view_as(p) for v, p in
                      zip(self.flat.split([p.numel() for p in self.params]), self.params)]
        if self.device.type == "cuda" and not self.ranks.cuda_aware():
            self.host = torch.empty(self.flat.shape, dtype=torch.float32, pin_memory=True)
        with torch.no_grad():          # rank 0's initial weights everywhere, as DDP does
            for view, p in zip(self.views, self.params):
                view.copy_(p)
            self._collective(self.ranks.comm.Bcast)
            for view, p in zip(self.views, self.params):
                p.copy_(view)
        return model

    def attach(self, optimizer, autocast):
        super().attach(optimizer, autocast)
        optimizer.register_step_pre_hook(lambda *_: self._allreduce_grads())

    @torch.no_grad()
    def _allreduce_grads(self):
        for view, p in zip(self.views, self.params):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
        mpi, comm = self.ranks.mpi, self.ranks.comm
        self._collective(lambda buf: comm.Allreduce(mpi.IN_PLACE, buf, op=mpi.SUM))
        self.flat.div_(self.world_size)
        for view, p in zip(self.views, self.params):
            if p.grad is not None:
                p.grad.copy_(view)

    def _collective(self, call):
        """Run an in-place MPI call on the flat buffer: on the device, or staged on the host."""
        mpi = self.ranks.mpi
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if self.host is not None:
            self.host.copy_(self.flat)
            call([self.host.numpy(), mpi.FLOAT])
            self.flat.copy_(self.host)
        elif self.device.type == "cuda":
            call([self.flat, mpi.FLOAT])
        else:
            call([self.flat.numpy(), mpi.FLOAT])
