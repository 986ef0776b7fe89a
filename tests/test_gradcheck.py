"""--check-grads 1 (spec §9.4) and --deterministic 1."""

import contextlib
import io
import re
from unittest import mock

import pytest
import torch

from distconvnet import cli
from distconvnet.layers.fc import FullyConnectedLayer as FcLayer

# A smooth net (no ReLU kinks or max-pool switches), so the original's coarse one-sided ε
# (0.02 conv, 0.01 fc) measures the slope well: conv and fc on 3x4x4 dummy images.
SMOOTH_DEF = """
[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1

[conv1]
type=conv
inputs=data
channels=3
filters=4
padding=1
stride=1
filterSize=3
initW=0.1
sharedBiases=1
neuron=tanh[1,1]

[fc10]
type=fc
inputs=conv1
outputs=10
initW=0.1

[probs]
type=softmax
inputs=fc10

[logprob]
type=cost.logreg
inputs=labels,probs
"""
SMOOTH_PARAMS = """
[conv1]
epsW=0.01
epsB=0.02
momW=0.9
momB=0.9
wc=0

[fc10]
epsW=0.01
epsB=0.02
momW=0.9
momB=0.9
wc=0

[logprob]
coeff=1
"""
NUM_MATRICES = 4        # conv1 and fc10: weights[0] and biases each


@pytest.fixture
def smooth_net(tmp_path):
    (tmp_path / "def.cfg").write_text(SMOOTH_DEF)
    (tmp_path / "params.cfg").write_text(SMOOTH_PARAMS)
    return ["--layer-def", str(tmp_path / "def.cfg"), "--layer-params",
            str(tmp_path / "params.cfg"), "--data-provider", "dummy-lr-48",
            "--check-grads", "1", "--gpu", "0"]


def test_correct_gradients_pass(smooth_net, capsys):
    assert cli.main(smooth_net) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"ALL {NUM_MATRICES} TESTS PASSED"
    verdicts = [line for line in out if line.endswith("GRADIENT CHECK")]
    assert verdicts == ["PASS conv1 weights[0] GRADIENT CHECK", "PASS conv1 biases GRADIENT CHECK",
                        "PASS fc10 weights[0] GRADIENT CHECK", "PASS fc10 biases GRADIENT CHECK"]


class _DoubleGradient(torch.autograd.Function):
    """The identity forward, a backward that is twice the truth: a broken layer gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_a_wrong_gradient_fails(smooth_net, capsys, monkeypatch):
    forward = FcLayer.forward
    monkeypatch.setattr(FcLayer, "forward",
                        lambda self, *xs: _DoubleGradient.apply(forward(self, *xs)))
    assert cli.main(smooth_net) == 1
    out = capsys.readouterr().out.splitlines()
    # fc10's own gradients are doubled, and so is everything that flows back into conv1.
    assert out[-1] == f"{NUM_MATRICES}/{NUM_MATRICES} TESTS FAILED"
    assert "****FAIL**** fc10 weights[0] GRADIENT CHECK" in out


def test_deterministic_option_turns_on_deterministic_algorithms(monkeypatch):
    from distconvnet import knobs
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    try:
        knobs.use_deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_each_matrix_is_printed_as_soon_as_it_is_checked(smooth_net, monkeypatch):
    """The check takes minutes on bigger nets: every block shows before the next matrix starts,
    with its element count and time, after a first line that says how much work is ahead."""
    from distconvnet import gradcheck
    out = io.StringIO()
    printed_before_each = []
    numeric = gradcheck._numeric

    def recording_numeric(*args):
        printed_before_each.append(out.getvalue())
        return numeric(*args)

    monkeypatch.setattr(gradcheck, "_numeric", recording_numeric)
    with contextlib.redirect_stdout(out):
        assert cli.main(smooth_net) == 0
    # conv1: 4 filters of 3x3x3; fc10: 10 outputs of 4x4x4 inputs; biases: 4 and 10
    assert printed_before_each[0].splitlines() == [
        "Checking 4 weight matrices and bias vectors: 762 elements, one forward pass of 7 "
        "cases each"]
    assert printed_before_each[1].splitlines()[1:] == [
        "PASS conv1 weights[0] GRADIENT CHECK", mock.ANY, mock.ANY]
    assert "PASS fc10 weights[0] GRADIENT CHECK" in printed_before_each[3]
    assert re.fullmatch(r"    108 elements, \d+\.\d{3} sec", printed_before_each[1].splitlines()[3])


def test_a_net_with_kinks_is_named_up_front(smooth_net, tmp_path, capsys):
    (tmp_path / "def.cfg").write_text(
        SMOOTH_DEF.replace("neuron=tanh[1,1]", "neuron=relu").replace(
            "[fc10]", "[pool1]\ntype=pool\npool=max\ninputs=conv1\nsizeX=2\nstride=2\n"
                      "channels=4\n\n[fc10]").replace("inputs=conv1\noutputs", "inputs=pool1\n"
                                                                                 "outputs"))
    cli.main(smooth_net)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("warning: conv1_neuron (relu), pool1 (max) are not smooth: ")
    assert lines[2] == "PASS conv1 weights[0] GRADIENT CHECK" or \
        lines[2] == "****FAIL**** conv1 weights[0] GRADIENT CHECK"


def test_a_smooth_net_gets_no_warning(smooth_net, capsys):
    cli.main(smooth_net)
    assert not any(line.startswith("warning:") for line in capsys.readouterr().out.splitlines())
