"""The image provider's reader process: it unpickles, checks and plans data batches
(image_plan.py) and lays their JPEGs out for DALI (JpegRuns) in shared memory, so that none of
that Python runs in the training process. In a thread there it held the GIL for a quarter of
the time, and the training thread, which needs the GIL for every kernel launch, left the GPU
idle for half of each batch (BENCHMARKS.md, 2026-12-04).

Two children read batches side by side (one alone was slower than the trainer on 2 cores).
The parent owns `SLOTS` shared-memory slots and lends one with each request; the child writes
the batch's JPEG runs into it (or, when the batch does not fit, into a larger block it makes,
which replaces the slot) and answers with the plan's arrays as plain data, which the parent
reads with the restricted unpickler like any other pickle. The slot comes back with
ReadBatch.release, once DALI is done with the batch. A data error raised in the child is raised
again in the parent, when the trainer asks for that batch.

The child comes from multiprocessing's fork server, never from a fork of the parent, which may
have started CUDA and DALI's threads. The server, started once per process, imports this module
(image_plan and torch, for the per-batch draws; no DALI): the first child starts in about as
long as torch takes to import, later ones in milliseconds.
"""

import multiprocessing
import os
import queue
import signal
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from .. import safepickle
from ..errors import DataError
from .image_plan import JpegRuns, Plan

SLOTS = 3              # one being decoded, one read ahead, one spare while the two hand over
FIRST_SLOT = 1 << 20   # bytes; a slot grows to the largest batch it has held, plus a quarter
SHM_DIR = "/dev/shm"   # where Linux keeps shared memory: a tmpfs, 64 MiB in a default container
STOP_TIMEOUT = 10.0    # seconds the child gets to finish its batch and exit before it is killed


@dataclass
class ReadBatch:
    """A data batch read and planned, waiting for the decoder."""
    key: tuple              # (epoch, batchnum)
    path: str               # the batch's file or directory
    num_images: int         # in the whole batch (before sharding)
    plan: Plan
    jpegs: JpegRuns
    warnings: list          # one line per bad image replaced by another
    release: object = lambda: None   # gives the batch's slot back; idempotent


class _Slot:
    def __init__(self, block):
        self.block = block

    @property
    def name(self):
        return self.block.name

    @property
    def size(self):
        return self.block.size


class ImageReader:
    """`processes` child processes reading batches on request, each one batch at a time, into
    `SLOTS` shared-memory slots. `read` may be called from up to `processes` threads at once."""

    def __init__(self, planner, data_path, processes=2):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._idle = queue.Queue()       # children waiting for a request
        self._free = queue.Queue()       # slots no batch holds
        self._children, self._slots = [], []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._children, self._slots)
        for _ in range(SLOTS):
            self._free.put(self._new_slot(_create_block(FIRST_SLOT)))
        for _ in range(processes):
            connection, child_end = context.Pipe()
            # Daemonic: should the parent end without close(), multiprocessing stops the child
            # at exit; should it die outright, the child sees its pipe close and ends.
            process = context.Process(target=_serve, args=(child_end, planner, str(data_path)),
                                      name="image-reader", daemon=True)
            process.start()
            child_end.close()
            self._children.append((process, connection))
            self._idle.put((process, connection))

    def _new_slot(self, block):
        slot = _Slot(block)
        with self._lock:
            self._slots.append(slot)
        return slot

    def read(self, key, run_size):
        """ReadBatch of batch `key` (epoch, batchnum) in runs of `run_size` cases, or the child's
        error raised here. Waits for a free slot and an idle child first."""
        slot = self._free.get()
        process, connection = self._idle.get()
        try:
            connection.send((tuple(key), run_size, slot.name, slot.size))
            reply = safepickle.loads(connection.recv_bytes(), "the image reader's reply")
        except (EOFError, OSError):
            self._free.put(slot)
            process.join(STOP_TIMEOUT)
            raise DataError(f"data batch {key[1]}: the image reader process ended unexpectedly "
                            f"(exit code {process.exitcode})") from None
        except BaseException:
            self._free.put(slot)
            raise
        finally:
            self._idle.put((process, connection))
        if "error" in reply:
            self._free.put(slot)
            raise DataError(reply["error"]) if reply.get("data_error") else \
                RuntimeError(f"the image reader process failed: {reply['error']}")
        if reply["slot"] != slot.name:          # the child made a larger block for this batch
            self._retire(slot)
            slot = self._new_slot(SharedMemory(reply["slot"]))
        runs = [tuple(run) for run in reply["runs"]]
        size = runs[-1][0] + runs[-1][1] * runs[-1][2] if runs else 0
        data = np.ndarray((size,), np.uint8, buffer=slot.block.buf)
        plan = Plan(reply["sources"], reply["feeds"], reply["labels"],
                    (reply["hot_rows"], reply["hot_cols"]), reply["replaced"])
        released = threading.Event()

        def release():
            if not released.is_set():
                released.set()
                self._free.put(slot)
        return ReadBatch(tuple(key), reply["path"], reply["num_images"], plan,
                         JpegRuns(data, runs, reply["lengths"]), reply["warnings"], release)

    def _retire(self, slot):
        with self._lock:
            self._slots.remove(slot)
        _free_block(slot.block)

    def close(self):
        """Stop the children and free every slot."""
        self._finalizer()


def _create_block(size):
    """A new block of `size` bytes, or one line saying there is no room for it: tmpfs makes a
    block of any size and kills the process that writes past its room (SIGBUS)."""
    try:
        free = os.statvfs(SHM_DIR)
        room = free.f_bavail * free.f_frsize
    except OSError:
        room = None               # not Linux's tmpfs: SharedMemory says what is wrong
    if room is not None and size > room:
        raise DataError(f"the image provider needs {-(-size >> 20)} MiB of shared memory in "
                        f"{SHM_DIR} for a data batch in flight ({SLOTS} at most) and "
                        f"{room >> 20} MiB are free: give the machine (or the container: "
                        f"--shm-size) a larger {SHM_DIR}")
    try:
        return SharedMemory(create=True, size=size)
    except OSError as e:
        raise DataError(f"the image provider could not get {-(-size >> 20)} MiB of shared "
                        f"memory for a data batch in flight ({e})") from None


def _shutdown(children, slots):
    for process, connection in children:
        if process.is_alive():
            try:
                connection.send(None)
            except OSError:
                pass                    # it is ending already
    for process, connection in children:
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
        connection.close()
    for slot in slots:
        _free_block(slot.block)
    slots.clear()


_UNMAPPABLE = []    # blocks whose memory a view still exports: unlinked, unmapped at exit


def _free_block(block):
    """Unlink a block (its name goes now, its memory when the last mapping does) and unmap it
    here unless an array still views it."""
    try:
        block.unlink()
    except FileNotFoundError:
        pass
    try:
        block.close()
    except BufferError:
        _UNMAPPABLE.append(block)


def _serve(connection, planner, data_path):
    """The child: read and plan each batch asked for until told to stop or the parent is gone.
    Ctrl-C is for the parent, which stops the child; errors go back to it, never to stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opened = {}
    try:
        while (request := connection.recv()) is not None:
            key, run_size, slot_name, slot_size = request
            try:
                reply = _read_into(planner, data_path, key, run_size, slot_name, slot_size, opened)
            except DataError as e:
                reply = {"error": str(e), "data_error": True}
            except Exception as e:     # a bug or no memory: the parent says which
                reply = {"error": f"{type(e).__name__}: {e}"}
            connection.send_bytes(safepickle.dumps(reply))
    except (EOFError, OSError):
        pass                            # the parent is gone


def _read_into(planner, data_path, key, run_size, slot_name, slot_size, opened):
    host = planner.read(data_path, *key)
    plan = planner.plan(host)
    lengths = np.array([len(host.jpegs[i]) for i in plan.sources], np.int32)
    _, total = JpegRuns.layout(lengths, run_size)
    if total > slot_size:
        outgrown = opened.pop(slot_name, None)
        if outgrown is not None:
            outgrown.close()
        block = _create_block(total + total // 4)
        slot_name = block.name
    else:
        block = opened.get(slot_name) or SharedMemory(slot_name)
    opened[slot_name] = block
    packed = JpegRuns.pack(host.jpegs, plan.sources, run_size,
                           lambda size: np.ndarray((size,), np.uint8, buffer=block.buf))
    rows, cols = plan.hot
    return {"path": str(host.path), "num_images": len(host.jpegs), "sources": plan.sources,
            "feeds": plan.feeds, "labels": plan.labels,
            "hot_rows": np.asarray(rows, np.int64), "hot_cols": np.asarray(cols, np.int64),
            "replaced": [(int(c), int(i)) for c, i in plan.replaced],
            "warnings": planner.replacement_warnings(host, plan),
            "runs": [list(run) for run in packed.runs], "lengths": packed.lengths,
            "slot": slot_name}
