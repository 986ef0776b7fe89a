"""`--gpu 0,1` without a launcher: start one worker process per listed GPU and watch over them,
so the original's one-line multi-GPU commands keep working.

Each worker runs `python -m distconvnet train <the same arguments>` with torchrun's variables
set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so it takes the code path it would take
under torchrun. The parent prints nothing of its own unless a worker fails; then it stops the
others and exits non-zero. Workers live in their own session, so Ctrl-C reaches the parent
alone, which passes it on once (a second Ctrl-C kills them).
"""

import os
import signal
import subprocess
import sys
import time

import torch

from ..errors import OptionError
from .launch import NCCL_SAFE_ENV, SPAWNED_BY, DistributedError, free_port, started_by_launcher

POLL_S = 0.1
GRACE_S = 5           # how long workers told to stop get before SIGKILL


class WorkerFailed(DistributedError):
    def __init__(self, rank, returncode):
        if returncode < 0:
            what = f"was killed by {signal.Signals(-returncode).name}"
            self.exit_code = 128 - returncode
        else:
            what = f"exited with status {returncode}"
            self.exit_code = returncode
        super().__init__(f"worker rank {rank} {what}; the other workers were stopped")


def workers_to_spawn(opts, env=None):
    """How many worker processes to start for these options; 1 means: run in this process.

    The one place that decides. One worker per --gpu entry when several are listed and no
    launcher started this process (--device cpu too: then they are CPU workers, for tests).
    A cfg's `gpu=` annotations (spec §8) do not change the count: every worker holds the whole
    net and takes its share of each minibatch, which gives the original's update for data-,
    model- and hybrid-parallel cfgs alike. Gradient checks always run in one process."""
    if started_by_launcher(env) or opts.check_grads or len(opts.gpu) <= 1:
        return 1
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        have = torch.cuda.device_count()
        missing = [g for g in opts.gpu if g >= have]
        if missing:
            raise OptionError(f"--gpu {','.join(map(str, opts.gpu))}: this machine has {have} "
                              f"CUDA device(s)")
    return len(opts.gpu)


def spawn_workers(argv, count):
    """Run `count` workers of `distconvnet train argv`; 0 when all succeed, else raise."""
    # As torchrun does: without a thread budget, N workers' thread pools fight over the cores.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
    shared = {**threads, **os.environ, **NCCL_SAFE_ENV, "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(count),
              "LOCAL_WORLD_SIZE": str(count), SPAWNED_BY: str(os.getpid())}
    command = [sys.executable, "-m", "distconvnet", "train", *argv]
    workers = []
    try:
        for rank in range(count):
            env = {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            workers.append(subprocess.Popen(command, env=env, start_new_session=True))
        return _supervise(workers)
    finally:
        _stop(workers)


def _supervise(workers):
    interrupted = False
    while True:
        try:
            codes = [worker.poll() for worker in workers]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed and not interrupted:
                raise WorkerFailed(*failed[0])
            if all(code is not None for code in codes):
                return 130 if interrupted else 0
            time.sleep(POLL_S)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGINT)


def _stop(workers):
    """SIGTERM to the workers still running, SIGKILL to those alive GRACE_S later."""
    alive = [worker for worker in workers if worker.poll() is None]
    for worker in alive:
        worker.terminate()
    deadline = time.monotonic() + GRACE_S
    for worker in alive:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
