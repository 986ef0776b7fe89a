"""neuron: every type of spec §4.4 forward and backward against float64 formulas, the original's
gradient conventions at kinks, the implicit `<layer>_neuron` layer, and neuron-spec errors."""

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError
from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet
from layer_helpers import FakeInput, check_error


def neuron_cfg(spec):
    return f"[act]\ntype=neuron\ninputs=in\nneuron={spec}\n"


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# spec -> (f, f') in float64, straight from spec §4.4 and the original's gradient rules
FORMULAS = {
    "ident": (lambda x: x, lambda x: np.ones_like(x)),
    "relu": (lambda x: np.maximum(0, x), lambda x: (x > 0) * 1.0),
    "brelu[1.5]": (lambda x: np.minimum(1.5, np.maximum(0, x)),
                   lambda x: ((x > 0) & (x < 1.5)) * 1.0),
    "softrelu": (lambda x: np.where(x > 4, x, np.log(1 + np.exp(x))),
                 lambda x: np.where(x > 4, 1.0, np.exp(x) / (1 + np.exp(x)))),
    "logistic": (sigmoid, lambda x: sigmoid(x) * (1 - sigmoid(x))),
    "tanh[1.7159,0.6667]": (lambda x: 1.7159 * np.tanh(0.6667 * x),
                            lambda x: 1.7159 * 0.6667 * (1 - np.tanh(0.6667 * x) ** 2)),
    "abs": (np.abs, lambda x: np.where(x > 0, 1.0, -1.0)),
    "square": (lambda x: x * x, lambda x: 2 * x),
    "sqrt": (np.sqrt, lambda x: 0.5 / np.sqrt(x)),
    "linear[2, -0.5]": (lambda x: 2 * x - 0.5, lambda x: np.full_like(x, 2.0)),
    "log[0.5]": (lambda x: np.log(0.5 + x), lambda x: 1 / (0.5 + x)),
    "drelu[0.7]": (lambda x: x - 0.7 * np.tanh(x / 0.7), lambda x: np.tanh(x / 0.7) ** 2),
}
POSITIVE_ONLY = {"sqrt", "log[0.5]"}


def sample(spec, shape=(5, 12)):
    """Fresh inputs in the function's domain, away from kinks, across softrelu's x > 4 branch."""
    if spec in POSITIVE_ONLY:
        return torch.rand(shape, dtype=torch.float64) * 3 + 0.1
    x = torch.randn(shape, dtype=torch.float64) * 3
    return torch.where(x.abs() < 0.01, x + 0.05, x)


@pytest.mark.parametrize("spec", sorted(FORMULAS))
def test_forward_and_backward_match_the_formula(make_layer, spec):
    layer = make_layer(neuron_cfg(spec), [FakeInput(outputs=12)])
    f, df = FORMULAS[spec]
    x = sample(spec).requires_grad_()
    out = layer(x)
    np.testing.assert_allclose(out.detach().numpy(), f(x.detach().numpy()), rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    np.testing.assert_allclose(x.grad.numpy(), upstream.numpy() * df(x.detach().numpy()),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", sorted(FORMULAS))
def test_gradcheck(make_layer, spec):
    layer = make_layer(neuron_cfg(spec), [FakeInput(outputs=12)])
    x = sample(spec, (3, 12))
    if spec.startswith("brelu"):
        x = torch.where((x - 1.5).abs() < 0.01, x + 0.05, x)
    if spec == "softrelu":
        x = torch.where((x - 4).abs() < 0.01, x + 0.05, x)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


def test_softrelu_returns_x_itself_above_4(make_layer):
    layer = make_layer(neuron_cfg("softrelu"), [FakeInput(outputs=4)])
    x = torch.tensor([[4.5, 10.0, 4.0, 3.0]], dtype=torch.float64)
    expected = [4.5, 10.0, np.log1p(np.exp(4.0)), np.log1p(np.exp(3.0))]
    np.testing.assert_allclose(layer(x)[0].numpy(), expected, rtol=1e-14)


def test_gradients_at_the_kinks_follow_the_original(make_layer):
    """relu and brelu pass the gradient only strictly inside their linear range; abs: −1 at 0."""
    x = torch.tensor([[0.0, 1.5, -1.0, 2.0, 0.5]], dtype=torch.float64)
    expected = {"relu": [0, 1, 0, 1, 1], "brelu[1.5]": [0, 0, 0, 0, 1], "abs": [-1, 1, -1, 1, 1]}
    for spec, slopes in expected.items():
        layer = make_layer(neuron_cfg(spec), [FakeInput(outputs=5)])
        xg = x.clone().requires_grad_()
        layer(xg).sum().backward()
        assert xg.grad[0].tolist() == slopes, spec


def test_image_input_keeps_its_geometry_and_prints_flat(make_layer):
    layer = make_layer(neuron_cfg("relu"), [FakeInput(channels=4, size=3)])
    assert (layer.channels, layer.img_size, layer.outputs) == (4, 3, 36)
    assert layer.neuron is None     # neuron= is the layer itself, nothing to attach above it
    assert layer.init_line() == "Initialized neuron layer 'act' on GPUs 0, producing 36 outputs"
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer(x), x.clamp_min(0))


def test_inline_neuron_becomes_a_layer_named_after_its_host(tmp_path):
    layer_def = tmp_path / "layers.cfg"
    layer_def.write_text("[data]\ntype=data\ndataIdx=0\n\n"
                         "[join]\ntype=concat\ninputs=data\nneuron=tanh[2,0.5]\n\n"
                         "[sq]\ntype=cost.sum2\ninputs=join\n")
    layer_params = tmp_path / "params.cfg"
    layer_params.write_text("[sq]\ncoeff=1\n")
    net = ConvNet(str(layer_def), str(layer_params), BuildContext(lambda idx: 6))
    assert list(net.layers) == ["data", "join", "join_neuron", "sq"]
    assert net.layers["sq"].input_names == ["join_neuron"]
    assert net.init_lines()[-1] == ("Initialized neuron layer 'join_neuron' on GPUs 0, "
                                    "producing 6 outputs")
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = (2 * np.tanh(0.5 * x.numpy())) ** 2
    assert np.isclose(net([x]).objective.item(), expected.sum())


@pytest.mark.parametrize("order", ["before", "after"])
def test_an_inline_neuron_takes_a_free_name_where_a_layer_has_its_own(tmp_path, order):
    taken = "[join_neuron]\ntype=concat\ninputs=data\n\n"
    host = "[join]\ntype=concat\ninputs=data\nneuron=abs\n\n"
    layer_def = tmp_path / "layers.cfg"
    layer_def.write_text("[data]\ntype=data\ndataIdx=0\n\n" +
                         (taken + host if order == "before" else host + taken) +
                         "[both]\ntype=concat\ninputs=join,join_neuron\n\n"
                         "[sq]\ntype=cost.sum2\ninputs=both\n")
    layer_params = tmp_path / "params.cfg"
    layer_params.write_text("[sq]\ncoeff=1\n")
    net = ConvNet(str(layer_def), str(layer_params), BuildContext(lambda idx: 6))
    assert net.layers["join_neuron_1"].input_names == ["join"]
    assert net.layers["both"].input_names == ["join_neuron_1", "join_neuron"]
    x = torch.randn(3, 6, dtype=torch.float64)
    assert np.isclose(net([x]).objective.item(), 2 * (x ** 2).sum().item())


# -- errors ----------------------------------------------------------------------------------


def test_nrelu_is_not_supported(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(neuron_cfg("nrelu"), [FakeInput(outputs=4)])
    check_error(excinfo, 4, "act", "'nrelu' is not supported", "never implemented")


@pytest.mark.parametrize("spec", ["relux", "tanh[1]", "tanh[1,2,3]", "brelu[x]", "relu[]",
                                  "Relu", "abstanh[1,2]"])
def test_an_unparsable_spec_lists_the_valid_types(make_layer, spec):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(neuron_cfg(spec), [FakeInput(outputs=4)])
    check_error(excinfo, 4, "act", f"unable to parse neuron type '{spec}'",
                "relu: f(x) = max(0, x)", "tanh[a,b]: f(x) = a * tanh(b * x)",
                "drelu[a]", "must be floats")


@pytest.mark.parametrize("spec, words", [("brelu[0]", "positive bound"),
                                         ("drelu[0]", "must not be 0")])
def test_parameters_that_break_the_formula(make_layer, spec, words):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(neuron_cfg(spec), [FakeInput(outputs=4)])
    check_error(excinfo, 4, "act", words)


def test_a_neuron_layer_needs_its_neuron_key(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer("[act]\ntype=neuron\ninputs=in\n", [FakeInput(outputs=4)])
    check_error(excinfo, 1, "act", "missing required key 'neuron'")


def test_a_neuron_layer_takes_one_input(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer("[act]\ntype=neuron\ninputs=a,b\nneuron=relu\n",
                   [FakeInput("a", outputs=4), FakeInput("b", outputs=4)])
    check_error(excinfo, 3, "act", "takes 1 input")
