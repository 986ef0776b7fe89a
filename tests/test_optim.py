"""Ccn2SGD against hand-computed updates (spec §5.2, §8 "Weight updates")."""

import io
import math

import pytest
import torch

from optim_helpers import FakeWeightLayer, make_learning, set_grads

from distconvnet.errors import CheckpointError, ConfigError
from distconvnet.optim import Ccn2SGD, weight_stats


def values(t):
    return t.detach().tolist()


def test_three_steps_with_momentum_decay_and_undecayed_biases():
    layer = FakeWeightLayer("fc1", [[[1.0, -2.0]]], [0.5], epsW="0.1", epsB="0.2", momW=0.5,
                            momB=0.9, wc=0.01)
    opt = Ccn2SGD([layer], minibatch=2)
    w, b = layer.weights[0], layer.biases
    # Hand-computed: inc = μ·inc − ε·grad/2 − 0.01·ε·W; biases: inc = 0.9·inc − 0.2·grad/2.
    expected_w = [[0.799, -2.398], [0.497701, -2.994602], [0.146553799, -3.689908398]]
    expected_inc = [[-0.201, -0.398], [-0.301299, -0.596602], [-0.351147201, -0.695306398]]
    expected_b = [0.3, -0.08, -0.622]
    for k in range(3):
        set_grads(layer, [[[4.0, 8.0]]], [2.0])
        opt.step()
        assert values(w)[0] == pytest.approx(expected_w[k], abs=1e-12)
        assert values(opt.increment(w))[0] == pytest.approx(expected_inc[k], abs=1e-12)
        assert values(b) == pytest.approx([expected_b[k]], abs=1e-12)
        assert w.grad is None and b.grad is None          # the optimizer clears what it used


def test_nominal_case_count_uses_mini_over_passes_and_ceil_for_biases():
    # mini 7 over 2 passes: weights divide by 3.5, biases by ceil(3.5) = 4 (spec §8).
    layer = FakeWeightLayer("fc1", [[[0.0]]], [0.0], epsW="1.0", epsB="1.0")
    opt = Ccn2SGD([layer], minibatch=7, num_passes=2)
    set_grads(layer, [[[7.0]]], [7.0])
    opt.step()
    assert values(layer.weights[0]) == [[pytest.approx(-2.0)]]
    assert values(layer.biases) == [pytest.approx(-1.75)]


def test_update_period_two_accumulates_gradients_and_scales_by_both_passes():
    slow = FakeWeightLayer("slow", [[[0.0]]], [0.0], epsW="1.0", epsB="1.0", updatePeriod=2)
    fast = FakeWeightLayer("fast", [[[0.0]]], [0.0], epsW="1.0", epsB="1.0")
    opt = Ccn2SGD([slow, fast], minibatch=4)
    set_grads(slow, [[[4.0]]], [8.0])
    set_grads(fast, [[[4.0]]], [8.0])
    opt.step()
    assert values(slow.weights[0]) == [[0.0]]                  # not yet: gradient kept
    assert values(slow.weights[0].grad) == [[4.0]]
    assert values(fast.weights[0]) == [[-1.0]]
    slow.weights[0].grad += 12.0                               # what the second backward adds
    slow.biases.grad += 8.0
    set_grads(fast, [[[4.0]]], [8.0])
    opt.step()
    # Nnom = 2 passes × 4 cases: −(4 + 12)/8 and −(8 + 8)/8
    assert values(slow.weights[0]) == [[-2.0]]
    assert values(slow.biases) == [-2.0]
    assert slow.weights[0].grad is None
    assert values(fast.weights[0]) == [[-2.0]]


def test_active_pass_period_raises_the_effective_period():
    fc = FakeWeightLayer("fc", [[[0.0]]], [0.0], updatePeriod=1)
    conv = FakeWeightLayer("conv", [[[0.0]]], [0.0], updatePeriod=0)
    opt = Ccn2SGD([fc, conv], minibatch=512, num_passes=4, active_pass_period={"conv": 4})
    periods = {(g["layer"], g["kind"][0]): (g["update_period"], g["nominal_cases"])
               for g in opt.param_groups}
    assert periods[("fc", "weights")] == (1, 128.0)            # every 128-case microbatch
    assert periods[("conv", "weights")] == (4, 512.0)          # once per 512 cases
    bad = FakeWeightLayer("bad", [[[0.0]]], [0.0], updatePeriod=6)
    with pytest.raises(ConfigError, match="multiple"):
        Ccn2SGD([bad], minibatch=512, num_passes=4, active_pass_period={"bad": 4})


def test_zero_base_rate_skips_the_update_entirely():
    layer = FakeWeightLayer("frozen", [[[1.0]]], [1.0], epsW="0", epsB="0.0", momW=0.9, wc=0.5)
    opt = Ccn2SGD([layer], minibatch=1)
    set_grads(layer, [[[3.0]]], [3.0])
    opt.step()
    assert values(layer.weights[0]) == [[1.0]] and values(layer.biases) == [1.0]
    assert values(opt.increment(layer.weights[0])) == [[0.0]]
    assert layer.weights[0].grad is None


def test_missing_gradient_counts_as_zero():
    layer = FakeWeightLayer("fc", [[[2.0]]], [0.0], epsW="0.5", momW=0.5, wc=0.1)
    opt = Ccn2SGD([layer], minibatch=1)
    opt.state[layer.weights[0]]["inc"].fill_(1.0)
    opt.step()                                                 # no backward reached it
    # inc = 0.5·1 − 0.1·0.5·2 = 0.4
    assert values(layer.weights[0]) == [[pytest.approx(2.4)]]


def test_schedules_follow_set_progress():
    layer = FakeWeightLayer("fc", [[[0.0]]], [0.0], epsW="linear[base=1;tgtFactor=2]",
                            epsB="dexp[base=0.02;tgtFactor=10;numSteps=2]")
    opt = Ccn2SGD([layer], minibatch=1)
    assert opt.current_rates() == {"fc": {"epsW": [1.0], "epsB": 0.02}}
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()
    assert values(layer.weights[0]) == [[-1.0]]
    opt.set_progress(1.0)
    assert opt.current_rates()["fc"]["epsW"] == [0.5]
    assert opt.current_rates()["fc"]["epsB"] == pytest.approx(0.002)
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()
    assert values(layer.weights[0]) == [[-1.5]]


def test_wball_sets_fc_and_conv_column_norms_exactly_and_caps_local():
    fc = FakeWeightLayer("fc", [[[3.0, 4.0], [0.3, 0.4]]], [0.0, 0.0], wball=2.0, epsW="0.1")
    # sfc (parts=2, rows=1, outputs per part=2): a column spans both parts
    sfc = FakeWeightLayer("sfc", [[[[3.0, 0.3]], [[4.0, 0.4]]]], [0.0] * 4, type_name="sfc",
                          wball=1.0, epsW="0.1")
    conv = FakeWeightLayer("conv", [[[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.1]]]]],
                           [0.0, 0.0], type_name="conv", wball=1.0, epsW="0.1")
    # local (modules=2, groups=1, rows=2, filters=2): columns are (module, filter) pairs
    local = FakeWeightLayer("local", [[[[[3.0, 0.3], [4.0, 0.4]]], [[[0.0, 6.0], [0.0, 8.0]]]]],
                            [0.0], type_name="local", wball=1.0, epsW="0.1")
    opt = Ccn2SGD([fc, sfc, conv, local], minibatch=1)
    opt.step()                                                 # zero gradient: W unchanged
    assert values(fc.weights[0]) == [[pytest.approx(1.2), pytest.approx(1.6)],
                                     [pytest.approx(1.2), pytest.approx(1.6)]]
    assert values(sfc.weights[0]) == [[[pytest.approx(0.6), pytest.approx(0.6)]],
                                      [[pytest.approx(0.8), pytest.approx(0.8)]]]
    assert values(conv.weights[0].flatten(1)) == [[pytest.approx(0.5)] * 4,
                                                  [0.0, 0.0, 0.0, pytest.approx(1.0)]]
    assert values(local.weights[0]) == [[[[pytest.approx(0.6), 0.3],
                                          [pytest.approx(0.8), 0.4]]],
                                        [[[0.0, pytest.approx(0.6)],
                                          [0.0, pytest.approx(0.8)]]]]


def test_wc_norm_clamps_each_filters_spread():
    # spread = sqrt(Σ(w − mean)²)/n: filter [1,2,3,4] → sqrt(5)/4; [0,0,0,0.4] → sqrt(0.12)/4
    low, high = math.sqrt(0.12) / 4, math.sqrt(5.0) / 4
    filters = [[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.4]]], [[[5.0, 5.0], [5.0, 5.0]]]]
    conv = FakeWeightLayer("conv", [filters], [0.0] * 3, type_name="conv", epsW="0.1",
                           wcNormMin=2 * low, wcNormMax=high / 2)
    opt = Ccn2SGD([conv], minibatch=1)
    opt.step()
    w = values(conv.weights[0].flatten(1))
    assert w[0] == pytest.approx([0.5, 1.0, 1.5, 2.0])         # above max: halved
    assert w[1] == pytest.approx([0.0, 0.0, 0.0, 0.8])         # below min: doubled
    assert w[2] == [5.0] * 4                                   # no spread: left alone


def test_a_shared_matrix_is_one_group_with_the_owners_hyper_parameters():
    owner = FakeWeightLayer("a", [[[1.0]]], [0.0], epsW="0.5", momW=0.5)
    receiver = FakeWeightLayer("b", [[[1.0]], [[1.0]]], [0.0], epsW="0.25", momW=0.0, wc=0.3,
                               sources=[("a", 0), None])
    opt = Ccn2SGD([owner, receiver], minibatch=1)
    kinds = [(g["layer"], g["kind"]) for g in opt.param_groups]
    assert kinds == [("a", ("weights", 0)), ("a", ("biases",)), ("b", ("weights", 1)),
                     ("b", ("biases",))]
    shared, copy = owner.weights[0], receiver.weights[0]
    assert opt.receivers(shared) == [copy]
    opt.state[shared]["inc"].fill_(1.0)
    shared.grad = torch.tensor([[2.0]], dtype=torch.float64)
    copy.grad = torch.tensor([[4.0]], dtype=torch.float64)
    opt.step()
    # fc: each use at its own ε, the owner's μ 0.5 and no decay (the receiver's wc is ignored):
    # inc = 0.5·1 − 0.5·2 − 0.25·4 = −1.5
    assert values(shared) == [[-0.5]] and values(copy) == [[-0.5]]
    assert copy.grad is None
    assert opt.current_rates()["b"]["epsW"] == [0.25, 0.25]
    assert opt.increment(copy) is opt.increment(shared)
    assert opt.increments()["b"]["weights"][0] is opt.increment(shared)


@pytest.mark.parametrize("type_name, gpus, receiver_rate", [
    ("fc", [0], 0.25), ("sfc", [0], 0.25), ("local", [0], 0.25),
    ("conv", [0], 0.5), ("fc", [0, 1], 0.5)])
def test_whose_rate_a_receivers_gradient_takes(type_name, gpus, receiver_rate):
    """The original's useGrad=false weights (fc, sfc, local with one replica): the receiver's
    own ε; useGrad=true (conv, several replicas): the owner's. Each use divides by its own
    layer's case count (updatePeriod 2 for the receiver here)."""
    owner = FakeWeightLayer("a", [[[0.0]]], [0.0], type_name=type_name, gpus=gpus, epsW="0.5")
    receiver = FakeWeightLayer("b", [[[0.0]]], [0.0], type_name=type_name, gpus=gpus,
                               epsW="0.25", updatePeriod=2, sources=[("a", 0)])
    opt = Ccn2SGD([owner, receiver], minibatch=1)
    owner.weights[0].grad = torch.tensor([[1.0]], dtype=torch.float64)
    receiver.weights[0].grad = torch.tensor([[1.0]], dtype=torch.float64)
    opt.step()                                     # the owner's period: 1
    assert values(owner.weights[0])[0][0] == pytest.approx(-0.5 - receiver_rate / 2, abs=1e-15)
    assert opt.current_rates()["b"]["epsW"] == [receiver_rate]


@pytest.mark.parametrize("type_name", ["fc", "conv"])
def test_a_receiver_with_epsw_base_0_adds_no_gradient(type_name):
    owner = FakeWeightLayer("a", [[[0.0]]], [0.0], type_name=type_name, epsW="0.5")
    receiver = FakeWeightLayer("b", [[[0.0]]], [0.0], type_name=type_name, epsW="0",
                               sources=[("a", 0)])
    opt = Ccn2SGD([owner, receiver], minibatch=1)
    owner.weights[0].grad = torch.tensor([[1.0]], dtype=torch.float64)
    receiver.weights[0].grad = torch.tensor([[1000.0]], dtype=torch.float64)
    opt.step()
    assert values(receiver.weights[0]) == values(owner.weights[0]) == [[-0.5]]


def test_an_optimizer_state_without_receivers_still_loads():
    """Checkpoints written before receivers had groups of their own keys: their groups lack
    `receivers` and `owner_rate`; loading takes only the state from them anyway."""
    def net():
        owner = FakeWeightLayer("a", [[[1.0]]], [0.0], epsW="0.5", momW=0.5)
        return [owner, FakeWeightLayer("b", [[[1.0]]], [0.0], sources=[("a", 0)])]

    first = net()
    opt = Ccn2SGD(first, minibatch=1)
    opt.state[first[0].weights[0]]["inc"].fill_(3.0)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["receivers"], group["owner_rate"]
    second = net()
    opt2 = Ccn2SGD(second, minibatch=1)
    opt2.load_state_dict(saved)
    assert values(opt2.increment(second[1].weights[0])) == [[3.0]]
    assert opt2.param_groups[0]["receivers"][0]["layer"] == "b"


def _net():
    return [FakeWeightLayer("fc", [[[1.0, 2.0]]], [0.5], epsW="0.1", epsB="0.2", momW=0.9,
                            momB=0.9, wc=0.01, updatePeriod=2)]


def _train(layers, opt, steps):
    for _ in range(steps):
        for layer in layers:
            for w in layer.weights:
                w.grad = torch.ones_like(w) if w.grad is None else w.grad + 1.0
            layer.biases.grad = torch.ones_like(layer.biases)
        opt.step()


def test_state_round_trip_restores_increments_and_pending_passes():
    first = _net()
    opt = Ccn2SGD(first, minibatch=2)
    _train(first, opt, 3)                     # two updates done, one pass pending
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = _net()
    for a, b in zip(first[0].weights, second[0].weights):
        b.data.copy_(a.data)
        b.grad = a.grad.clone()
    second[0].biases.data.copy_(first[0].biases.data)
    opt2 = Ccn2SGD(second, minibatch=2)
    opt2.load_state_dict(saved)
    assert opt2.state[second[0].weights[0]]["pending"] == 1
    _train(first, opt, 1)
    _train(second, opt2, 1)
    assert torch.equal(first[0].weights[0], second[0].weights[0])
    assert torch.equal(opt.increment(first[0].weights[0]), opt2.increment(second[0].weights[0]))


def test_load_keeps_the_current_hyper_parameters_and_rejects_another_net():
    first = _net()
    opt = Ccn2SGD(first, minibatch=2)
    second = _net()
    second[0].learning = make_learning(1, epsW="0.3")
    opt2 = Ccn2SGD(second, minibatch=2)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.current_rates()["fc"]["epsW"] == [0.3]
    other = Ccn2SGD([FakeWeightLayer("conv", [[[1.0]]], [0.0])], minibatch=2)
    with pytest.raises(CheckpointError):
        other.load_state_dict(opt.state_dict())


def test_refresh_rereads_hyper_parameters_and_keeps_increments():
    layer = FakeWeightLayer("fc", [[[0.0]]], [0.0], epsW="1.0", momW=0.5)
    opt = Ccn2SGD([layer], minibatch=1)
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()                                                 # inc = −1, W = −1
    layer.learning = make_learning(1, epsW="2.0", momW=0.25)
    opt.refresh([layer])
    assert opt.current_rates()["fc"]["epsW"] == [2.0]
    assert values(opt.increment(layer.weights[0])) == [[-1.0]]
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()                                                 # inc = 0.25·(−1) − 2·1
    assert values(layer.weights[0]) == [[-3.25]]


def test_zero_grad_drops_accumulation_and_restarts_periods():
    layer = FakeWeightLayer("fc", [[[0.0]]], [0.0], epsW="1.0", updatePeriod=2)
    opt = Ccn2SGD([layer], minibatch=1)
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()
    opt.zero_grad()
    assert layer.weights[0].grad is None
    set_grads(layer, [[[1.0]]], [0.0])
    opt.step()
    assert values(layer.weights[0]) == [[0.0]]                 # a full period again


def test_weight_stats_rows_are_mean_absolute_values():
    layer = FakeWeightLayer("conv1", [[[1.0, -3.0]], [[0.0, 0.0]]], [2.0, -4.0], epsW="1.0")
    opt = Ccn2SGD([layer], minibatch=1)
    layer.weights[0].grad = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    opt.step()                                                 # inc = [−1, 1], W = [0, −2]
    assert weight_stats([layer], opt) == [("conv1", "weights[0]", 1.0, 1.0),
                                          ("conv1", "weights[1]", 0.0, 0.0),
                                          ("conv1", "biases", 3.0, 0.0)]
