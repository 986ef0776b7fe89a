"""Who may write a run directory: one run at a time, and only into its own directory.

Before it trains, the process that saves (rank 0) claims its run directory: it creates the
directory (which proves, before any work, that checkpoints can be written there) and takes an
advisory lock, `.lock`, holding its host, pid and start time. The lock is an flock on that file,
so the kernel drops it when the process dies however it dies; a second run that finds it held
stops with one line naming the owner. A lock file whose owner is gone (killed, or its machine
lost) is taken over with a warning. A run that ends, well or with an error, removes the file.

A directory that holds another run's checkpoints or metrics log (not the directory of the
checkpoint this run resumes) is refused: saving there would replace that run's newest
checkpoint and splice its log. `--overwrite-save-file 1` asks for that; the other run's metrics
log is then removed, and its checkpoints go at this run's first save.
"""

import atexit
import fcntl
import os
import socket
import sys
import time

from . import checkpoint
from .errors import CheckpointError
from .metrics import LOG_NAME

LOCK_NAME = ".lock"

_held = {}      # real path of a run directory -> the Claim this process holds on it


class Claim:
    """A held run directory; `release()` (also run at exit) gives it up."""

    def __init__(self, run_dir, fd, created):
        self.run_dir, self.fd, self.created = run_dir, fd, created
        atexit.register(self.release)

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(os.path.join(self.run_dir, LOCK_NAME))
            for directory in self.created:      # of a run that failed before writing anything
                if os.listdir(directory):
                    break
                os.rmdir(directory)
        except OSError:
            pass                                # gone already: nothing to give back
        os.close(self.fd)
        self.fd = None
        _held.pop(os.path.realpath(self.run_dir), None)
        atexit.unregister(self.release)


def claim(run_dir, resumed_from=None, overwrite=False, keep_dir=False):
    """Claim `run_dir` for this process's run. `resumed_from`: the checkpoint file it resumes
    (its directory is this run's own); `overwrite`: --overwrite-save-file 1; `keep_dir`: leave
    the directory even if the run writes nothing (torchrun's restarts look for it)."""
    real = os.path.realpath(run_dir)
    if real in _held:       # an earlier session of this process that ended without releasing
        _held[real].release()
    created, directory = [], os.path.abspath(run_dir)
    while not keep_dir and not os.path.exists(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd, stale_owner = _lock(os.path.join(run_dir, LOCK_NAME))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to '{run_dir}': "
                              f"{e.strerror or e}") from None
    held = Claim(run_dir, fd, created)
    try:
        _check_own_directory(run_dir, resumed_from, overwrite)
        if stale_owner:
            print(f"warning: {run_dir}: taking over the lock of a run that is gone "
                  f"({stale_owner})", file=sys.stderr, flush=True)
        # Only what the message of a second run says: the lock itself is the kernel's.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_me()}\n".encode(), 0)
    except OSError as e:
        held.release()
        raise CheckpointError(f"cannot write checkpoints to '{run_dir}': "
                              f"{e.strerror or e}") from None
    except BaseException:
        held.release()
        raise
    _held[real] = held
    return held


def _lock(path):
    """(fd holding the flock of `path`, the previous owner's line or ""). Retries when the file
    was removed between our open and our lock (its owner released it meanwhile)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise CheckpointError(f"'{os.path.dirname(path)}' is in use by another run "
                                  f"({owner or 'owner unknown'}): two runs saving into one "
                                  f"directory lose each other's checkpoints; wait for it to "
                                  f"end, or give this run another --save-file or --save-path") \
                from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read(fd)
        os.close(fd)


def _check_own_directory(run_dir, resumed_from, overwrite):
    names = [n for n in os.listdir(run_dir) if checkpoint.is_checkpoint_name(n)]
    has_log = os.path.exists(os.path.join(run_dir, LOG_NAME))
    own = resumed_from is not None and \
        os.path.realpath(os.path.dirname(resumed_from)) == os.path.realpath(run_dir)
    if own or not (names or has_log):
        return
    if not overwrite:
        held = f"checkpoint {max(names, key=checkpoint.position)}" if names else "metrics log"
        raise CheckpointError(f"'{run_dir}' holds another run's {held}: saving this run there "
                              f"would replace it; give another --save-file, or add "
                              f"--overwrite-save-file 1 to replace that run")
    if has_log:
        os.unlink(os.path.join(run_dir, LOG_NAME))


def _read(fd):
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def _me():
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
