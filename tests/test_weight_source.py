"""weightSource updates against a float64 reference of cuda-convnet2's rule, written here from
its code (WeightLayer::bpropCommon, getGradScale, getIncScale; Weights::update), not from ours:

  * fc layers keep the shared matrix's increment as their gradient target (useGrad=false):
    during backward each layer whose own epsW base is > 0 adds ε_layer/N × its (negative)
    gradient into the shared inc, the first one of a period scaling inc by the owner's momW;
  * only the owner then decays (its wc and ε) and adds inc to the matrix;
  * biases are never shared: each layer's inc = momB·inc + ε_B/N × its gradient.

A real net: data -> fc1 (owns W) -> fc2 (weightSource=fc1) -> cost.sum2 (Σ y²).
"""

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError
from distconvnet.gradcheck import check_gradients
from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet
from distconvnet.optim import Ccn2SGD

CASES, UNITS = 5, 4
LAYER_DEF = """
[data]
type=data
dataIdx=0

[fc1]
type=fc
inputs=data
outputs=4
initW=0.5

[fc2]
type=fc
inputs=fc1
outputs=4
weightSource=fc1
initW=0.5
initB=0.1

[cost]
type=cost.sum2
inputs=fc2
"""
# The receiver's momW and wc must not act: only the owner's do.
LAYER_PARAMS = """
[fc1]
epsW=0.1
epsB=0.05
momW=0.9
momB=0.8
wc=0.01

[fc2]
epsW={receiver_eps}
epsB=0.02
momW=0.3
momB=0.7
wc=0.5

[cost]
coeff=0.5
"""


def build(tmp_path, receiver_eps):
    layer_def, layer_params = tmp_path / "layers.cfg", tmp_path / "params.cfg"
    layer_def.write_text(LAYER_DEF)
    layer_params.write_text(LAYER_PARAMS.format(receiver_eps=receiver_eps))
    torch.manual_seed(3)
    model = ConvNet(str(layer_def), str(layer_params),
                    BuildContext({0: UNITS}.__getitem__)).double()
    return model, Ccn2SGD(model.weight_layers(), minibatch=CASES)


def original_steps(w, b1, b2, x, steps, receiver_eps, coeff=0.5):
    """The original's updates of (W, b1, b2), in our layouts (W: outputs × inputs)."""
    eps1, epsb1, mom, momb1, wc = 0.1, 0.05, 0.9, 0.8, 0.01
    epsb2, momb2 = 0.02, 0.7
    inc, incb1, incb2 = np.zeros_like(w), np.zeros_like(b1), np.zeros_like(b2)
    history = []
    for _ in range(steps):
        y1 = x @ w.T + b1
        y2 = y1 @ w.T + b2
        v2 = -coeff * 2 * y2                  # the original's v: minus the cost's gradient
        v1 = v2 @ w
        updates = 0
        # Backward runs fc2 (the receiver) first; each use adds into the shared increment.
        for acts, v, eps in ((y1, v2, receiver_eps), (x, v1, eps1)):
            if eps > 0:
                inc = (mom if updates == 0 else 1.0) * inc + eps / CASES * (v.T @ acts)
                updates += 1
        incb2 = momb2 * incb2 + epsb2 / CASES * v2.sum(0)
        incb1 = momb1 * incb1 + epsb1 / CASES * v1.sum(0)
        inc = inc - wc * eps1 * w                 # the owner's update: its wc and ε
        w, b1, b2 = w + inc, b1 + incb1, b2 + incb2
        history.append((w, b1, b2))
    return history


@pytest.mark.parametrize("receiver_eps", [0.03, 0.0])
def test_fc_weight_source_updates_as_the_original(tmp_path, receiver_eps):
    model, optimizer = build(tmp_path, receiver_eps)
    fc1, fc2 = model.layers["fc1"], model.layers["fc2"]
    x = torch.randn(CASES, UNITS, dtype=torch.float64)
    expected = original_steps(fc1.weights[0].detach().numpy().copy(),
                              fc1.biases.detach().numpy().copy(),
                              fc2.biases.detach().numpy().copy(), x.numpy(), 2, receiver_eps)
    for w, b1, b2 in expected:
        model([x]).objective.backward()
        optimizer.step()
        for layer in (fc1, fc2):
            np.testing.assert_allclose(layer.weights[0].detach().numpy(), w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fc1.biases.detach().numpy(), b1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fc2.biases.detach().numpy(), b2, rtol=0, atol=1e-12)


def test_the_matrix_is_counted_once_and_both_layers_see_the_same_values(tmp_path):
    model, _ = build(tmp_path, 0.03)
    fc1, fc2 = model.layers["fc1"], model.layers["fc2"]
    assert torch.equal(fc1.weights[0], fc2.weights[0])
    assert model.num_parameters() == UNITS * UNITS + 2 * UNITS


def test_a_source_must_be_an_earlier_layer(tmp_path):
    layer_def = tmp_path / "layers.cfg"
    layer_def.write_text(LAYER_DEF.replace("weightSource=fc1\n", "").replace(
        "outputs=4\ninitW=0.5\n\n[fc2]", "outputs=4\ninitW=0.5\nweightSource=fc2\n\n[fc2]"))
    (tmp_path / "params.cfg").write_text(LAYER_PARAMS.format(receiver_eps=0.1))
    with pytest.raises(ConfigError, match=r"layer 'fc1': weightSource 'fc2\[0\]' names no "
                                          r"earlier weight matrix"):
        ConvNet(str(layer_def), str(tmp_path / "params.cfg"),
                BuildContext({0: UNITS}.__getitem__))


def test_the_gradient_check_checks_each_layers_use(tmp_path):
    """As the original printed a check per layer's weights[i]: each copy holds its own layer's
    gradient, against a finite difference through that layer alone."""
    model, _ = build(tmp_path, 0.03)
    results = list(check_gradients(model, [torch.randn(CASES, UNITS, dtype=torch.float64)]))
    assert [(r.layer, r.what) for r in results] == [
        ("fc1", "weights[0]"), ("fc1", "biases"), ("fc2", "weights[0]"), ("fc2", "biases")]
    assert all(r.passed for r in results)
