"""What the optimizer tests build: layers as Ccn2SGD reads them, in float64."""

import torch
from torch import nn

from distconvnet.layers.base import WeightLearning
from distconvnet.schedule import parse_schedule


class FakeWeightLayer:
    """What the optimizer reads from a WeightLayer, nothing more (float64 for exact checks)."""

    def __init__(self, name, weights, biases, type_name="fc", sources=None, gpus=(0,),
                 **learning):
        self.name, self.type_name, self.gpus = name, type_name, list(gpus)
        self.weights = [w if isinstance(w, nn.Parameter)
                        else nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in weights]
        self.biases = nn.Parameter(torch.tensor(biases, dtype=torch.float64))
        self.weight_sources = sources or [None] * len(weights)
        self.learning = make_learning(len(weights), **learning)


def make_learning(n, epsW="0.1", epsB="0.1", momW=0.0, momB=0.0, wc=0.0, wball=0.0,
                  updatePeriod=0, wcNormMax=0.0, wcNormMin=0.0):
    return WeightLearning(eps_w=[parse_schedule(epsW)] * n, eps_b=parse_schedule(epsB),
                          mom_w=[momW] * n, mom_b=momB, wc=[wc] * n, wball=[wball] * n,
                          update_period=updatePeriod, wc_norm_max=[wcNormMax] * n,
                          wc_norm_min=[wcNormMin] * n)


def set_grads(layer, weight_grads, bias_grad):
    for w, g in zip(layer.weights, weight_grads):
        w.grad = torch.tensor(g, dtype=torch.float64)
    layer.biases.grad = torch.tensor(bias_grad, dtype=torch.float64)
