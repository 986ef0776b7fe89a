"""The ranks of a job and how they talk: joined once at run start, before anything is built, so
that the run's setup can agree on things (the seed, the run directory, the checkpoint to
resume) before a strategy (strategy.py) is chosen for the net.

    OneProcess   one process: every collective is the identity
    TorchRanks   torch.distributed over gloo or NCCL (torchrun, spawned workers, mpirun with
                 --dist-backend gloo/nccl); DDP and the pass schedule train over it
    MpiRanks     mpi4py's COMM_WORLD (mpirun --dist-backend mpi), no torch process group
"""

import os

import torch

from ..errors import OptionError
from .launch import DistributedError, init_distributed, teardown

CUDA_AWARE_VAR = "DISTCONVNET_MPI_CUDA_AWARE"


def join_job(info, backend, device):
    """This process's ranks: one process, or its job's (`--dist-backend`: auto = nccl on CUDA,
    gloo on the CPU; mpi only under mpirun)."""
    if info.world_size == 1:
        return OneProcess(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise OptionError("--dist-backend nccl needs CUDA devices; use gloo on the CPU")
    if backend == "mpi":
        if info.launcher != "mpirun":
            raise OptionError(f"--dist-backend mpi: start the ranks with mpirun (this job was "
                              f"started by {info.launcher})")
        return MpiRanks(info, device)
    return TorchRanks(info, backend, device)


class OneProcess:
    rank, world_size, is_master, backend = 0, 1, True, None

    def __init__(self, device):
        self.device = device

    def broadcast(self, value):
        return value

    def all_gather(self, value):
        return [value]

    def close(self):
        pass


class TorchRanks:
    """The job's torch process group; object collectives through torch too."""

    def __init__(self, info, backend, device):
        self.rank, self.world_size, self.is_master = info.rank, info.world_size, info.is_master
        self.backend, self.device = backend, device
        init_distributed(info, backend, device)

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


class MpiRanks:
    """mpi4py's COMM_WORLD; tensors go straight from GPU memory when the MPI is CUDA-aware
    (DISTCONVNET_MPI_CUDA_AWARE=1 or 0 where mpi4py cannot tell), else through the host."""

    backend = "mpi"

    def __init__(self, info, device):
        self.rank, self.world_size, self.is_master = info.rank, info.world_size, info.is_master
        self.device = device
        from mpi4py import MPI
        self.mpi, self.comm = MPI, MPI.COMM_WORLD
        if self.comm.Get_size() != info.world_size:
            raise DistributedError(f"MPI sees {self.comm.Get_size()} ranks, the launcher "
                                   f"{info.world_size}")

    def cuda_aware(self):
        if os.environ.get(CUDA_AWARE_VAR) in ("0", "1"):
            return os.environ[CUDA_AWARE_VAR] == "1"
        query = getattr(self.mpi, "Query_cuda_support", None)
        return bool(query()) if query is not None else False

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
