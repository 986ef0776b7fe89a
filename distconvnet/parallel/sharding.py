"""Which cases of a batch each rank holds: the one place for that arithmetic (spec §8).

Every --mini slice [i·M, (i+1)·M) of a data batch (the last one may be shorter) is cut into
world_size contiguous parts of ceil(length/W) cases, as cuda-convnet2 cut a minibatch into
microbatches; rank r holds part r of every slice. A rank may get no cases of a short slice. Over
all ranks, every case appears exactly once, and every rank takes part in every slice's update.
Pure arithmetic: providers (which keep only their rank's rows), the strategies (which cut a
batch into minibatches) and the pass schedule (which fetches other ranks' rows) all ask here.
"""

import numpy as np


def part_size(length, world_size):
    """How many cases of a slice of `length` cases each part holds (the last may hold fewer)."""
    return -(-length // world_size)


def shard_bounds(length, rank, world_size):
    """[start, stop) of `rank`'s part of a slice of `length` cases (maybe empty)."""
    part = part_size(length, world_size)
    return min(rank * part, length), min((rank + 1) * part, length)


def owners(start, stop, length, world_size):
    """(rank, lo, hi) for each rank whose part of a slice of `length` cases holds some of the
    rows [start, stop), in rank order."""
    part = part_size(length, world_size)
    return [(rank, max(start, rank * part), min(stop, (rank + 1) * part))
            for rank in range(start // part, -(-stop // part))]


def slice_sizes(num_cases, minibatch):
    """The size of each whole --mini slice of a batch of `num_cases` cases."""
    return [min(minibatch, num_cases - start) for start in range(0, num_cases, minibatch)]


def shard_sizes(num_cases, minibatch, rank, world_size):
    """How many cases of each --mini slice `rank` holds, in order: the lengths of the pieces
    that shard_indices concatenates (a piece may be empty)."""
    sizes = []
    for length in slice_sizes(num_cases, minibatch):
        lo, hi = shard_bounds(length, rank, world_size)
        sizes.append(hi - lo)
    return sizes


def shard_indices(num_cases, minibatch, rank, world_size):
    """The cases of a batch that belong to `rank`, in the batch's order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if minibatch < 1:
        raise ValueError(f"minibatch must be positive, got {minibatch}")
    pieces = []
    for start in range(0, num_cases, minibatch):
        lo, hi = shard_bounds(min(minibatch, num_cases - start), rank, world_size)
        pieces.append(np.arange(start + lo, start + hi, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def minibatches(mats, num_cases, minibatch, rank, world_size):
    """(this rank's rows of each matrix, the whole slice's size) for each --mini slice of a
    batch of `num_cases` cases (over all ranks), whose rows of this rank `mats` hold."""
    start = 0
    for size, whole in zip(shard_sizes(num_cases, minibatch, rank, world_size),
                           slice_sizes(num_cases, minibatch)):
        yield [m[start:start + size] for m in mats], whole
        start += size
