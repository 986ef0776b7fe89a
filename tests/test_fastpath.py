"""The trainer's step recorded as a CUDA graph (fastpath.GraphedStep) against the eager step."""

import copy
import os
import re

import pytest
import torch

from distconvnet import fastpath, knobs
from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet
from distconvnet.optim import Ccn2SGD

LAYERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layers")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cifar_net():
    """The cifar10-11pct net with rates that fall linearly over training."""
    torch.manual_seed(3)
    ctx = BuildContext({0: 3 * 24 * 24, 1: 1}.__getitem__, 10)
    params = os.path.join(LAYERS, "layer-params-cifar10-11pct.cfg")
    with open(params) as f:
        text = re.sub(r"^(eps[WB])=([0-9.e-]+)$", r"\1=linear[base=\2;tgtFactor=0.1]", f.read(),
                      flags=re.M)
    assert "linear[" in text
    return ConvNet(os.path.join(LAYERS, "layers-cifar10-11pct.cfg"), params, ctx,
                   layer_params_text=text)


def test_graphed_steps_train_like_eager_steps_as_the_rates_move():
    device = torch.device("cuda")
    knobs.for_run(device, "fp32", deterministic=False)     # TF32 off, the trainer's stream
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    eager_net = fastpath.place(cifar_net(), device)
    graphed_net = copy.deepcopy(eager_net)
    autocast = fastpath.autocast(device, "fp32")
    steps, optimizers = [], []
    for net, graphs in ((eager_net, False), (graphed_net, True)):
        optimizer = Ccn2SGD(net.weight_layers(), 32, fused=True)
        optimizers.append(optimizer)
        steps.append(fastpath.train_step(net, optimizer, autocast, graphs=graphs))
    generator = torch.Generator(device="cpu").manual_seed(0)
    for k in range(7):          # 2 eager warm-ups, the capture, 4 replays
        mats = [torch.randn(32, 3, 24, 24, generator=generator).to(device),
                torch.randint(0, 10, (32,), generator=generator).float().to(device)]
        costs = []
        for optimizer, step in zip(optimizers, steps):
            optimizer.set_progress(k / 7)          # rates that move (the cfg's schedules)
            costs.append(step(mats))
        for name in costs[0]:
            torch.testing.assert_close(costs[1][name], costs[0][name], rtol=1e-4, atol=1e-5)
    assert steps[1].take_warnings() == []
    assert [graph is not None for graph in steps[1]._graphs.values()] == [True]
    for a, b in zip(eager_net.parameters(), graphed_net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_net.parameters(), graphed_net.parameters()):
        torch.testing.assert_close(optimizers[1].increment(b), optimizers[0].increment(a),
                                   rtol=1e-4, atol=1e-6)
