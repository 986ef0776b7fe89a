"""optim_fused.py: the compiled fused update gives the foreach update's numbers, on the steps
it covers, and only on those."""

import pytest
import torch
from optim_helpers import FakeWeightLayer, set_grads
from torch import nn

from distconvnet.optim import Ccn2SGD


def fused_and_foreach(monkeypatch, layers_for, compile_update):
    """Two optimizers over equal copies of some layers: the foreach update and the fused one
    (its compiled function left eager unless `compile_update`)."""
    if not compile_update:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    plain, fused = layers_for(), layers_for()
    return (plain, Ccn2SGD(plain, minibatch=4)), (fused, Ccn2SGD(fused, minibatch=4, fused=True))


def two_layers(**conv_learning):
    torch.manual_seed(0)
    fc = FakeWeightLayer("fc", [torch.randn(3, 5).tolist()], [0.1, 0.2, 0.3], epsW="0.1",
                         epsB="0.2", momW=0.9, momB=0.5, wc=0.01)
    conv_learning = {"epsW": "linear[base=0.05;tgtFactor=0.1]", "epsB": "0.01", "momW": 0.8,
                     **conv_learning}
    conv = FakeWeightLayer("conv", [torch.randn(2, 3).tolist()], [0.5, -0.5], type_name="conv",
                           **conv_learning)
    return [fc, conv]


def run_steps(pairs, steps, grads_of):
    for step in range(steps):
        for layers, opt in pairs:
            opt.set_progress(step / steps)       # the rates change every batch
            for layer, grads in zip(layers, grads_of(step)):
                set_grads(layer, *grads)
            opt.step()


def grads_for(step):
    g = torch.Generator().manual_seed(step)
    return [([torch.randn(3, 5, generator=g).tolist()], torch.randn(3, generator=g).tolist()),
            ([torch.randn(2, 3, generator=g).tolist()], torch.randn(2, generator=g).tolist())]


def test_the_fused_update_is_the_foreach_update(monkeypatch):
    pairs = fused_and_foreach(monkeypatch, two_layers, compile_update=False)
    run_steps(pairs, 4, grads_for)
    (plain, plain_opt), (fused, fused_opt) = pairs
    for a, b in zip(plain, fused):
        for p, q in zip(a.weights + [a.biases], b.weights + [b.biases]):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
            assert torch.allclose(plain_opt.increment(p), fused_opt.increment(q), rtol=0,
                                  atol=1e-12)
    assert fused_opt._fused._coefficients is not None        # it did run


@pytest.mark.parametrize("case, fused_steps, fused_matrices", [
    ("missing gradient", 0, 0), ("update period", 1, 4), ("base rate 0", 2, 3)])
def test_the_fused_update_covers_only_steps_where_every_learned_matrix_is_due(
        monkeypatch, case, fused_steps, fused_matrices):
    conv = {"update period": {"updatePeriod": 2}, "base rate 0": {"epsB": "0"}}.get(case, {})
    pairs = fused_and_foreach(monkeypatch, lambda: two_layers(**conv), compile_update=False)
    fused = pairs[1][1]._fused
    calls, update = [], fused._update
    monkeypatch.setattr(fused, "_update", lambda *a: (calls.append(len(a[0])), update(*a)))

    def grads(step):
        g = grads_for(step)
        return g[:1] if case == "missing gradient" else g
    run_steps(pairs, 2, grads)
    assert calls == [fused_matrices] * fused_steps
    for a, b in zip(pairs[0][0], pairs[1][0]):
        for p, q in zip(a.weights + [a.biases], b.weights + [b.biases]):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_fused_update_on_cuda_matches_float64_foreach(monkeypatch):
    def on_cuda():
        layers = two_layers()
        for layer in layers:
            layer.weights = [nn.Parameter(w.detach().float().cuda()) for w in layer.weights]
            layer.biases = nn.Parameter(layer.biases.detach().float().cuda())
        return layers
    plain = two_layers()
    plain_opt = Ccn2SGD(plain, minibatch=4)
    fused = on_cuda()
    fused_opt = Ccn2SGD(fused, minibatch=4, fused=True)
    for step in range(4):
        for layers, opt, cast in ((plain, plain_opt, lambda t: t),
                                  (fused, fused_opt, lambda t: t.float().cuda())):
            opt.set_progress(step / 4)
            for layer, (wg, bg) in zip(layers, grads_for(step)):
                for w, g in zip(layer.weights, wg):
                    w.grad = cast(torch.tensor(g, dtype=torch.float64))
                layer.biases.grad = cast(torch.tensor(bg, dtype=torch.float64))
            opt.step()
    for a, b in zip(plain, fused):
        for p, q in zip(a.weights + [a.biases], b.weights + [b.biases]):
            assert torch.allclose(p, q.double().cpu(), rtol=1e-5, atol=1e-6)
