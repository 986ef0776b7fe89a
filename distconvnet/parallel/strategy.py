"""How a run trains across its ranks: one protocol, one module per way, one registry.

A Strategy is chosen once, when the net exists (`choose`), and the training loop (train.py)
talks only to it:

    strategy = STRATEGY(ranks, plan, model, device, compile_model)   wrap the net
    strategy.attach(optimizer, autocast)                              the optimizer it steps
    for mats, cases in strategy.minibatches(batch, whole_cases, mini):   cut a data batch
        costs = strategy.train_minibatch(mats, cases)                 forward, backward, update
    sums = strategy.batch_costs(sums)                                 costs the console reads
    sums, cases = strategy.sum_over_ranks(sums, cases)                summed over the ranks
    strategy.before_test()                                            every copy current
    strategy.close()

`fuses_update` says whether the optimizer may fuse its update into one compiled kernel (the
pass schedule updates layers pass by pass, so it may not). Adding a way of training is one
module with a class that implements this protocol (subclassing Ranked gives the collectives
every strategy shares) and one line in STRATEGIES; docs/extending.md shows one.
"""

import gc
import importlib
from typing import Protocol

import torch

from . import sharding
from .launch import DistributedError


class Strategy(Protocol):
    fuses_update: bool
    rank: int
    world_size: int
    is_master: bool

    @classmethod
    def fits(cls, plan, ranks) -> bool: ...

    def attach(self, optimizer, autocast) -> None: ...

    def minibatches(self, batch, whole_cases, minibatch): ...

    def train_minibatch(self, mats, cases) -> dict: ...

    def batch_costs(self, sums) -> dict: ...

    def sum_over_ranks(self, sums, cases): ...

    def gather_rows(self, tensors, minibatch): ...

    def before_test(self) -> None: ...

    def take_warnings(self) -> list: ...

    def close(self) -> None: ...


# Tried in this order; the first that fits the net's parallel plan and the job's ranks trains.
STRATEGIES = {
    "pass schedule": ".passes:PassScheduleStrategy",   # spec §8's passes: hybrid, model parallel
    "mpi": ".data_parallel:MpiDataParallel",           # data parallel, mpi4py all-reduce
    "ddp": ".data_parallel:DdpDataParallel",           # data parallel, torch DDP
    "single": ".single:SingleProcess",                 # one process, one pass
}


def choose(plan, ranks):
    """The strategy class for a net's parallel plan and the job's ranks."""
    for entry in STRATEGIES.values():
        module, name = entry.split(":")
        cls = getattr(importlib.import_module(module, __package__), name)
        if cls.fits(plan, ranks):
            return cls
    raise DistributedError(f"no way of training fits this net on {ranks.world_size} process(es)")


class Ranked:
    """What every strategy shares: its ranks, the minibatch cut, the cost sums and row
    gathering over the ranks. Subclasses supply fits(), attach() and train_minibatch()."""

    fuses_update = True

    def __init__(self, ranks):
        self.ranks = ranks
        self.rank, self.world_size, self.is_master = ranks.rank, ranks.world_size, \
            ranks.is_master
        self.device = ranks.device
        self.cost_layout = None     # [(cost name, number of values)], agreed on first use

    def minibatches(self, batch, whole_cases, minibatch):
        """(this rank's piece, the whole minibatch's size) of each --mini slice of a training
        batch; every rank knows `whole_cases` (its provider sharded the batch), so no rank
        asks the others."""
        return sharding.minibatches(batch.mats, whole_cases, minibatch, self.rank,
                                    self.world_size)

    def batch_costs(self, sums):
        return sums

    def sum_over_ranks(self, sums, cases):
        """({cost name: sums over all ranks}, all ranks' cases): unchanged for one process;
        else float64 on the host, from one all-reduce of this rank's sums and cases packed in
        the run's cost layout."""
        if self.world_size == 1:
            return sums, cases
        if self.cost_layout is None:
            self.cost_layout = merged_layouts(self.ranks.all_gather(cost_layout(sums)))
        totals = self.ranks.sum_on_every_rank(pack_costs(sums, cases, self.cost_layout,
                                                         self.device, self.rank))
        values = totals[:-1].split([length for _, length in self.cost_layout])
        return {name: v for (name, _), v in zip(self.cost_layout, values)}, int(totals[-1])

    def gather_rows(self, tensors, minibatch):
        """Rows of this rank's shard of a test batch (features, labels...), back in the
        batch's order on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return tensors
        parts = self.ranks.gather([t.detach().cpu() for t in tensors])
        if not self.is_master:
            return None
        num_cases = sum(part[0].shape[0] for part in parts)
        whole = [torch.empty((num_cases,) + t.shape[1:], dtype=t.dtype) for t in parts[0]]
        for rank, part in enumerate(parts):
            rows = torch.from_numpy(sharding.shard_indices(num_cases, minibatch, rank,
                                                           self.world_size))
            if len(rows) != part[0].shape[0]:
                raise DistributedError(f"rank {rank} sent {part[0].shape[0]} rows where its "
                                       f"shard of {num_cases} cases has {len(rows)}")
            for target, t in zip(whole, part):
                target[rows] = t
        return whole

    def before_test(self):
        pass

    def take_warnings(self):
        return []

    def close(self):
        """DDP's reducer and the pass schedule hold process groups: dropped here, the groups
        end inside the teardown, not whenever the last reference goes (possibly at interpreter
        shutdown, where gloo's threads can abort the process)."""
        self.drop_groups()
        gc.collect()
        self.ranks.close()

    def drop_groups(self):
        pass


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
