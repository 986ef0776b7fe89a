"""parallel/strategy.py: the registry picks the first strategy that fits a net and its ranks,
and a way of training added as docs/extending.md shows (one class, one registry line) trains a
run through the CLI."""

import numpy as np
import torch
from net_helpers import TINY, shipped
from trainer_fixtures import event_costs, run_in_process, tiny_args

from distconvnet import fastpath
from distconvnet.parallel import strategy
from distconvnet.parallel.passes import PassScheduleStrategy
from distconvnet.parallel.plan import Plan, nodes_of
from distconvnet.parallel.ranks import OneProcess
from distconvnet.parallel.single import SingleProcess
from distconvnet.parallel.strategy import Ranked


class HalvesOnOneProcess(Ranked):
    """docs/extending.md's example: each minibatch's gradient accumulated over two halves."""

    trained = 0               # minibatches, over all runs

    @classmethod
    def fits(cls, plan, ranks):
        return ranks.world_size == 1 and plan.num_passes == 1

    def __init__(self, ranks, plan, model, device, compile_model):
        super().__init__(ranks)
        self.forward = fastpath.forward_fn(model, compile_model)

    def attach(self, optimizer, autocast):
        self.optimizer, self.autocast = optimizer, autocast

    def train_minibatch(self, mats, cases):
        type(self).trained += 1
        costs = {}
        half = (mats[0].shape[0] + 1) // 2
        for start in (0, half):
            with self.autocast():
                out = self.forward([m[start:start + half] for m in mats])
            out.objective.backward()
            for name, values in out.costs.items():
                costs[name] = costs.get(name, 0) + values.detach().float()
        self.optimizer.step()
        return costs


def test_the_first_strategy_that_fits_trains():
    one = OneProcess(torch.device("cpu"))
    assert strategy.choose(Plan(nodes_of(shipped("tiny", TINY))), one) is SingleProcess
    hybrid = Plan(nodes_of(shipped("test-2gpu-hybrid", TINY)))
    assert strategy.choose(hybrid, one) is PassScheduleStrategy


def test_a_strategy_added_to_the_registry_trains_the_run(digit_cifar, tmp_path, monkeypatch):
    """The halves give each update the whole minibatch's gradient (the costs sum over cases),
    so the run tests as the plain one does, to rounding."""
    argv = tiny_args(digit_cifar, tmp_path / "plain", "--epochs", 1, "--test-freq", 5,
                     "--seed", 3, "--device", "cpu")
    status, plain, err = run_in_process(argv)
    assert status == 0, err
    monkeypatch.setattr(strategy, "STRATEGIES", {"halves": f"{__name__}:HalvesOnOneProcess",
                                                 **strategy.STRATEGIES})
    HalvesOnOneProcess.trained = 0
    argv[argv.index("--save-path") + 1] = str(tmp_path / "halves")
    status, halves, err = run_in_process(argv)
    assert status == 0, err
    assert HalvesOnOneProcess.trained == 5 * 4          # 5 batches of 64 cases, --mini 16
    np.testing.assert_allclose(event_costs(halves), event_costs(plain), rtol=1e-4)
