"""Helpers for tests that build one layer at a time: a stand-in input layer, the check of a
parse error's text, and a float64 gradient check over a layer's inputs and parameters."""

import torch


class FakeInput:
    """Stands in for an already-built input layer: only what consumers may look at."""

    def __init__(self, name="in", outputs=None, channels=None, size=None, gpus=(0,),
                 type_name="fake"):
        self.name, self.channels, self.img_size, self.gpus = name, channels, size, list(gpus)
        self.type_name = type_name
        self.outputs = outputs if outputs is not None else channels * size * size


def check_error(excinfo, line, layer, *fragments):
    err = excinfo.value
    assert (err.line, err.layer) == (line, layer)
    assert str(err).startswith(f"{err.path}:{line}: layer '{layer}': ")
    for fragment in fragments:
        assert fragment in str(err)


def gradcheck_layer(layer, xs):
    layer = layer.double()
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def run(*args):
        return torch.func.functional_call(layer, dict(zip(names, args[len(xs):])), args[:len(xs)])

    xs = [x.double().requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(run, (*xs, *params))
