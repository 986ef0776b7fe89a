"""Real `python convnet.py` processes that start in milliseconds, for tests that kill many.

A server process (this file, run as a script) imports torch and distconvnet once, then forks one
child per run: the child points its stdout and stderr at a log file and executes convnet.py as
__main__ with its own argv, exactly as `python convnet.py argv` would after its imports. A test
SIGKILLs a child at any instant it likes; or the child SIGKILLs itself at a chosen phase of its
n-th checkpoint save (`die`), instants too short to hit from outside. The hooks for that live
here and are installed only in the doomed child: the package has no test hooks.

Protocol, one JSON line per run on the server's stdin: {"argv": [...], "log": path,
"die": [phase, n] or null}; the server answers the child's pid, then its exit status (negative:
the signal that ended it), one line each.
"""

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONVNET = str(REPO / "convnet.py")
# Where inside a checkpoint save a child can die: half of the temp file written; the temp file
# whole and fsync'ed but not yet renamed; renamed, with the older checkpoint not yet removed.
SAVE_PHASES = ("mid-write", "before-rename", "after-rename")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class _HalfThenDie:
    """Stands in for the temp file's handle: half the bytes reach the disk, then the kill."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, payload):
        self.handle.write(payload[:len(payload) // 2])
        self.handle.flush()
        _die()


def _arm(phase, nth):
    from distconvnet import checkpoint, fileio
    real_atomic_write, real_open = checkpoint.atomic_write, open
    saves = 0

    def atomic_write(path, payload):
        nonlocal saves
        saves += 1
        if saves == nth and phase == "mid-write":
            fileio.open = lambda *args: _HalfThenDie(real_open(*args))
        elif saves == nth and phase == "before-rename":
            os.replace = lambda *args: _die()
        real_atomic_write(path, payload)
        if saves == nth and phase == "after-rename":
            _die()

    checkpoint.atomic_write = atomic_write


def _run_child(order):
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    if order["die"]:
        _arm(*order["die"])
    sys.argv = [CONVNET, *order["argv"]]
    status = 1
    try:
        runpy.run_path(CONVNET, run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve():
    # Imported once here, so that every fork starts ready; torch.optim imports torch._dynamo
    # (seconds) when the first optimizer is made.
    import torch._dynamo  # noqa: F401
    import torch.utils.serialization  # noqa: F401
    from distconvnet import cli, run, train  # noqa: F401
    from distconvnet.parallel import spawn  # noqa: F401
    print("ready", flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(order)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class ForkServer:
    """The test's end: start() a run, then kill it or wait() for it; one run at a time."""

    def __init__(self, env, timeout=60):
        """Starts the server and returns at once: it imports while the caller works."""
        self.timeout, self.ready, self.running = timeout, False, None
        self.process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""

    def start(self, argv, log, die=None):
        if not self.ready:
            assert self._line(time.monotonic() + self.timeout) == "ready"
            self.ready = True
        order = {"argv": [str(a) for a in argv], "log": str(log), "die": die}
        Path(log).touch()           # there to be read from now on; the child writes it afresh
        self.process.stdin.write(json.dumps(order).encode() + b"\n")
        self.process.stdin.flush()
        self.running = int(self._line(time.monotonic() + self.timeout))
        return self.running

    def poll(self, seconds=0.0):
        """The exit status of the current run if it ends within `seconds`, else None."""
        line = self._line(time.monotonic() + seconds, required=False)
        if line is not None:
            self.running = None
        return None if line is None else int(line)

    def wait(self):
        status = int(self._line(time.monotonic() + self.timeout))
        self.running = None
        return status

    def close(self):
        """Ends the server; a run still going (a failed test's) is killed first."""
        if self.running is not None:
            os.kill(self.running, signal.SIGKILL)
        self.process.stdin.close()
        self.process.wait(timeout=self.timeout)

    def _line(self, deadline, required=True):
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if not select.select([fd], [], [], max(left, 0))[0]:
                if required:
                    raise TimeoutError("the fork server did not answer in time")
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError("the fork server ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


if __name__ == "__main__":
    serve()
