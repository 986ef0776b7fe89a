"""The image provider's reader process: it reads and plans data batches (image_plan.py) for the
provider's decoder thread, so that their Python runs outside the training process.

For each (epoch, batchnum) the child sends back the plan's small arrays and the JPEG bytes of
the cases this rank decodes, packed into one `SharedMemory` block (case k's bytes at
offsets[k]:offsets[k + 1]). The parent feeds DALI numpy views of the block, and unlinks it as
soon as the batch is decoded: DALI copies what `feed_input` is given (external_source's
no_copy=False). A data error raised in the child reaches the parent as the same exception.

Children come from multiprocessing's fork server, never from a fork of the parent, which may
have initialised CUDA. The server, started once per process, imports the main module and this
one (image_plan and torch, for the per-batch draws; no DALI): the first child starts in about as
long as torch takes to import, the next ones in milliseconds. As with any multiprocessing use,
a script that makes the image provider on CUDA needs the `if __name__ == "__main__":` guard.
"""

import multiprocessing
import pickle
import signal
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from ..errors import DataError
from .image_plan import HostBatch, Plan

STOP_TIMEOUT = 10.0    # seconds the child gets to finish its batch and exit before it is killed


@dataclass
class ReadBatch:
    """A data batch read and planned, waiting for the decoder. Read in this process, `host`
    holds its images and the plan has its 'jpegs' feed; read by the reader process, `block`
    holds the JPEGs of the plan's cases until ReaderProcess.release, and `view_jpegs` makes the
    feed of them."""
    key: tuple                  # (epoch, batchnum)
    path: object                # the batch's file or directory
    num_images: int             # in the whole batch (before sharding)
    plan: Plan
    host: HostBatch = None
    block: SharedMemory = None
    offsets: np.ndarray = None  # (cases + 1,): case k's bytes are block[offsets[k]:offsets[k+1]]

    def view_jpegs(self):
        """Give the plan its 'jpegs' feed as per-case views of the block (no copy)."""
        if self.block is not None:
            data = np.frombuffer(self.block.buf, np.uint8, count=int(self.offsets[-1]))
            bounds = self.offsets.tolist()
            self.plan.feeds["jpegs"] = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ReaderProcess:
    """One child process reading and planning batches on request, one at a time."""

    def __init__(self, planner, data_path):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        self._connection, child_end = context.Pipe()
        # Daemonic: should the parent end without close(), multiprocessing stops the child at
        # exit; should it die outright, the child sees its pipe close and ends.
        self._process = context.Process(target=_serve, args=(child_end, planner, data_path),
                                        name="image-reader", daemon=True)
        self._process.start()
        child_end.close()
        self._blocks = {}       # name -> block received and not yet released

    def read(self, key):
        """ReadBatch of batch `key` (epoch, batchnum), or the child's error raised here."""
        try:
            self._connection.send(key)
            reply = self._connection.recv()
        except (EOFError, OSError):
            self._process.join(STOP_TIMEOUT)
            raise DataError(f"data batch {key[1]}: the image reader process ended unexpectedly "
                            f"(exit code {self._process.exitcode})") from None
        if isinstance(reply, BaseException):
            raise reply
        path, num_images, plan, name, offsets = reply
        block = self._blocks[name] = SharedMemory(name)
        return ReadBatch(key, path, num_images, plan, block=block, offsets=offsets)

    def release(self, batch):
        """Drop the batch's JPEG views and free its block (unlink also stops the resource
        tracker from reporting it as leaked)."""
        batch.plan.feeds.pop("jpegs", None)
        block, batch.block = self._blocks.pop(batch.block.name), None
        block.close()
        block.unlink()

    def close(self):
        """Stop the child and free the blocks of batches read and never decoded."""
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except OSError:
                pass                    # it is ending already
            self._process.join(STOP_TIMEOUT)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._connection.close()
        for block in self._blocks.values():
            block.close()
            block.unlink()
        self._blocks.clear()


def _serve(connection, planner, data_path):
    """The child: read and plan each batch asked for until told to stop or the parent is gone.
    Ctrl-C is for the parent, which stops the child; errors go back to it, never to stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while (key := connection.recv()) is not None:
            try:
                host = planner.read(data_path, *key)
                plan = planner.plan(host)
                name, offsets = _pack(plan.feeds.pop("jpegs"))
            except Exception as e:
                connection.send(_sendable(e))
                continue
            connection.send((host.path, len(host.jpegs), plan, name, offsets))
    except (EOFError, OSError):
        pass                            # the parent is gone


def _pack(jpegs):
    """(name, offsets) of a new shared block holding the JPEG arrays one after the other. The
    block stays registered with the resource tracker (shared with the parent) until the parent
    unlinks it, so a block is freed even if both processes die."""
    offsets = np.zeros(len(jpegs) + 1, np.int64)
    np.cumsum([jpeg.size for jpeg in jpegs], out=offsets[1:])
    block = SharedMemory(create=True, size=max(1, int(offsets[-1])))
    for jpeg, start, stop in zip(jpegs, offsets[:-1].tolist(), offsets[1:].tolist()):
        block.buf[start:stop] = jpeg
    block.close()
    return block.name, offsets


def _sendable(error):
    """The error itself where it survives pickling (all of ours do), else its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
