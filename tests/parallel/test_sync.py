"""The pieces of the strategies that need no second process: shard arithmetic, the forward
each data-parallel rank runs (scaling and the stand-in for an empty shard), cost sums and row
gathering over ranks simulated in one process, and which of them talk to the other ranks."""

import numpy as np
import pytest
import torch

from distconvnet.errors import OptionError
from distconvnet.model import NetOutput
from distconvnet.parallel.data_parallel import scaled_forward
from distconvnet.parallel.launch import DistributedError, LaunchInfo
from distconvnet.parallel.ranks import OneProcess, join_job
from distconvnet.parallel.sharding import shard_indices, shard_sizes
from distconvnet.parallel.single import SingleProcess
from distconvnet.parallel.strategy import Ranked, cost_layout, pack_costs
from distconvnet.providers import DataBatch

CPU = torch.device("cpu")


def piece_sizes(strategy, num_cases, minibatch):
    """The sizes of this rank's pieces of a batch whose rows this rank holds."""
    rows = sum(shard_sizes(num_cases, minibatch, strategy.rank, strategy.world_size))
    batch = DataBatch(1, 1, [torch.zeros(rows, 2)], 1)
    return [mats[0].shape[0] for mats, _ in strategy.minibatches(batch, num_cases, minibatch)]


@pytest.mark.parametrize("num_cases, minibatch, world_size", [
    (300, 13, 2), (300, 128, 3), (297, 128, 4), (5, 2, 4), (1, 7, 2), (0, 4, 2), (64, 64, 8)])
def test_shard_sizes_are_the_pieces_of_shard_indices(num_cases, minibatch, world_size):
    slices = -(-num_cases // minibatch)
    for rank in range(world_size):
        sizes = shard_sizes(num_cases, minibatch, rank, world_size)
        assert len(sizes) == slices                     # every rank takes part in every update
        assert sum(sizes) == len(shard_indices(num_cases, minibatch, rank, world_size))
    assert sum(sum(shard_sizes(num_cases, minibatch, r, world_size))
               for r in range(world_size)) == num_cases


def one_process():
    return SingleProcess(OneProcess(CPU), None, torch.nn.Linear(2, 2), CPU, False)


def test_one_process_takes_whole_minibatches():
    strategy = one_process()
    assert piece_sizes(strategy, 300, 128) == [128, 128, 44]
    batch = DataBatch(1, 1, [torch.zeros(300, 2)], 1)
    assert [cases for _, cases in strategy.minibatches(batch, 300, 128)] == [128, 128, 44]


class SimulatedRanks:
    """Rank `rank` of a world whose other ranks' contributions are given up front: `others`
    for the object collectives, `costs` {rank: (cost sums, cases)} for the all-reduce of cost
    sums. It counts the collectives it takes part in. Ranked(it) is a strategy's share."""

    def __init__(self, rank, world_size, others, costs=None):
        self.rank, self.world_size, self.is_master = rank, world_size, rank == 0
        self.device = CPU
        self.others, self.costs = others, costs or {}
        self.collectives = 0

    def all_gather(self, value):
        self.collectives += 1
        return [value if r == self.rank else self.others[r] for r in range(self.world_size)]

    def gather(self, value):
        return self.all_gather(value) if self.is_master else None

    def sum_on_every_rank(self, values):
        self.collectives += 1
        for rank, (sums, cases) in self.costs.items():
            values = values + pack_costs(sums, cases, self.strategy.cost_layout, values.device,
                                         rank)
        return values


def ranked(rank, world_size, others, costs=None):
    """A strategy's collectives over simulated ranks, which see the layout it agreed."""
    ranks = SimulatedRanks(rank, world_size, others, costs)
    ranks.strategy = Ranked(ranks)
    return ranks.strategy


def test_minibatch_pieces_come_from_the_whole_batch_count_without_asking_the_others():
    strategy = ranked(1, 2, {})
    assert piece_sizes(strategy, 27, 13) == [6, 6, 0]
    assert strategy.ranks.collectives == 0


def test_each_rank_backpropagates_world_size_times_its_objective():
    forward = scaled_forward(lambda mats: NetOutput(mats[0].sum(), {"cost": mats[0].sum(0)},
                                                    {}), 4)
    out = forward([torch.ones(3, 2)])
    assert out.objective.item() == 4 * 6
    assert out.costs["cost"].tolist() == [3.0, 3.0]      # costs are not scaled


def test_an_empty_shard_runs_a_zero_stand_in_that_contributes_nothing():
    seen = []
    weight = torch.ones(2, requires_grad=True)

    def net(mats):
        seen.append(tuple(m.shape for m in mats))
        return NetOutput((mats[0] @ weight).sum() + 1, {"cost": torch.tensor([5.0, 1.0])}, {})

    out = scaled_forward(net, 2)([torch.zeros(0, 2), torch.zeros(0)])
    assert seen == [((1, 2), (1,))]
    out.objective.backward()
    assert out.objective.item() == 0 and weight.grad.tolist() == [0.0, 0.0]
    assert out.costs["cost"].tolist() == [0.0, 0.0]


def test_cost_sums_add_over_ranks_in_float64_in_one_all_reduce_per_batch():
    """Rank 2's test shard is empty: it has no sums, and the agreed layout gives it zeros."""
    costs = {1: ({"logprob": torch.tensor([1.5, 2.0]), "sq": torch.tensor([4.0])}, 7),
             2: ({}, 0)}
    strategy = ranked(0, 3, {r: cost_layout(sums) for r, (sums, _) in costs.items()}, costs)
    mine = {"logprob": torch.tensor([0.25, 1.0]), "sq": torch.tensor([0.5])}
    sums, cases = strategy.sum_over_ranks(mine, 6)
    assert cases == 13
    assert sums["logprob"].dtype == torch.float64 and sums["logprob"].tolist() == [1.75, 3.0]
    assert sums["sq"].tolist() == [4.5]
    assert strategy.ranks.collectives == 2          # the layout, once per run, and the sums
    strategy.sum_over_ranks(mine, 6)
    assert strategy.ranks.collectives == 3


def test_costs_that_do_not_fit_the_runs_layout_are_refused():
    strategy = ranked(0, 2, {1: [("logprob", 3)]}, {1: ({}, 0)})
    with pytest.raises(DistributedError, match="rank 1 has 3 values of cost 'logprob'"):
        strategy.sum_over_ranks({"logprob": torch.tensor([0.25, 1.0])}, 6)
    strategy = ranked(0, 2, {1: [("logprob", 2)]}, {1: ({}, 0)})
    strategy.sum_over_ranks({"logprob": torch.tensor([0.25, 1.0])}, 6)
    with pytest.raises(DistributedError, match="rank 0's cost 'other'"):
        strategy.sum_over_ranks({"other": torch.tensor([1.0])}, 6)


def test_rows_come_back_in_the_batchs_order():
    num_cases, minibatch, world = 11, 4, 3
    rows = torch.arange(num_cases, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    parts = {r: [rows[torch.from_numpy(shard_indices(num_cases, minibatch, r, world))]]
             for r in range(world)}
    master = ranked(0, world, parts)
    (whole,) = master.gather_rows(parts[0], minibatch)
    assert torch.equal(whole, rows)
    assert ranked(1, world, parts).gather_rows(parts[1], minibatch) is None


def test_backends_that_cannot_work_are_refused():
    two = LaunchInfo(0, 0, 2, "torchrun")
    with pytest.raises(OptionError, match="--dist-backend nccl needs CUDA"):
        join_job(two, "nccl", CPU)
    with pytest.raises(OptionError, match="start the ranks with mpirun"):
        join_job(two, "mpi", CPU)
    assert isinstance(join_job(LaunchInfo(0, 0, 1, "single"), "mpi", CPU), OneProcess)


def test_one_process_is_the_identity():
    strategy = one_process()
    sums = {"logprob": torch.tensor([1.0])}
    assert strategy.sum_over_ranks(sums, 5) == (sums, 5)
    ranks = strategy.ranks
    assert ranks.broadcast("x") == "x" and ranks.all_gather(3) == [3]
    assert isinstance(strategy.forward, torch.nn.Linear)     # the net itself, unwrapped
    rows = [torch.ones(2)]
    assert strategy.gather_rows(rows, 4) is rows
    np.testing.assert_array_equal(piece_sizes(strategy, 7, 7), [7])
