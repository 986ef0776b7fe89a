"""dropout (inverted) and dropout2 (AlexNet's): mask statistics, test-time behaviour, the
enable=false quirk of dropout2, gradients, and layer-params errors (spec §4.3, §5)."""

import pytest
import torch

from distconvnet.cfg import read_cfg
from distconvnet.errors import ConfigError
from layer_helpers import FakeInput, check_error

KEEP = 0.75
CASES, DIM = 200, 50      # 10000 units: the kept fraction's standard deviation is 0.0043


def build(make_layer, type_name, params="", inp=None):
    return make_layer(f"[drop]\ntype={type_name}\ninputs=in\n", [inp or FakeInput(outputs=DIM)],
                      f"[drop]\n{params}")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


def test_dropout_trains_with_mask_over_keep(make_layer):
    layer = build(make_layer, "dropout", f"keep={KEEP}\n")
    x = torch.rand(CASES, DIM, dtype=torch.float64) + 0.5
    x.requires_grad_()
    out = layer(x)
    kept = out != 0
    assert abs(kept.double().mean().item() - KEEP) < 0.02
    assert torch.allclose(out[kept], x[kept] / KEEP)
    out.sum().backward()
    assert torch.allclose(x.grad, kept.double() / KEEP)


def test_dropout_is_the_identity_at_test_time_and_when_disabled(make_layer):
    x = torch.randn(CASES, DIM)
    layer = build(make_layer, "dropout", f"keep={KEEP}\n")
    layer.eval()
    assert torch.equal(layer(x), x)
    disabled = build(make_layer, "dropout", f"enable=false\nkeep={KEEP}\n")
    assert disabled.training
    assert torch.equal(disabled(x), x)


def test_dropout2_trains_with_an_unscaled_mask(make_layer):
    layer = build(make_layer, "dropout2", f"enable=1\nkeep={KEEP}\n")
    x = (torch.rand(CASES, DIM, dtype=torch.float64) + 0.5).requires_grad_()
    out = layer(x)
    kept = out != 0
    assert abs(kept.double().mean().item() - KEEP) < 0.02
    assert torch.equal(out[kept], x[kept])
    out.sum().backward()
    assert torch.equal(x.grad, kept.double())


def test_dropout2_scales_by_keep_at_test_time(make_layer):
    layer = build(make_layer, "dropout2", f"keep={KEEP}\n")
    layer.eval()
    x = torch.randn(4, DIM, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, KEEP * x)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, KEEP))


def test_dropout2_with_enable_false_always_multiplies_by_keep(make_layer):
    """spec §4.3's quirk: disabling dropout2 does not give the identity, even in training."""
    layer = build(make_layer, "dropout2", f"enable=0\nkeep={KEEP}\n")
    assert layer.training
    x = torch.randn(4, DIM, dtype=torch.float64)
    assert torch.allclose(layer(x), KEEP * x)


def test_defaults_are_enabled_with_keep_one_half(make_layer):
    layer = build(make_layer, "dropout2")
    assert (layer.enable, layer.keep) == (True, 0.5)
    out = layer(torch.ones(CASES, DIM))
    assert abs((out != 0).float().mean().item() - 0.5) < 0.02


def test_params_are_read_again_on_resume(make_layer, tmp_path):
    layer = build(make_layer, "dropout", "keep=0.9\n")
    path = tmp_path / "resume.cfg"
    path.write_text("[drop]\nenable=false\n")
    layer.set_params(read_cfg(str(path)).sections[0])
    assert (layer.enable, layer.keep) == (False, 0.5)


def test_image_inputs_keep_shape_and_geometry_but_print_flat(make_layer):
    layer = build(make_layer, "dropout2", inp=FakeInput(channels=8, size=4))
    assert (layer.channels, layer.img_size, layer.outputs) == (8, 4, 128)
    assert layer.init_line() == ("Initialized dropout2 layer 'drop' on GPUs 0, "
                                 "producing 128 outputs")
    assert layer(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    plain = build(make_layer, "dropout")
    assert plain.init_line() == "Initialized dropout layer 'drop' on GPUs 0, producing 50 outputs"


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["dropout", "dropout2"])
@pytest.mark.parametrize("params, line, words", [
    ("keep=1.5\n", 2, "keep=1.5: expected a probability in (0, 1]"),
    ("enable=1\nkeep=0\n", 3, "keep=0: expected a probability"),
    ("keep=half\n", 2, "keep='half': expected a number"),
    ("enable=maybe\n", 2, "expected a boolean"),
])
def test_bad_params(make_layer, type_name, params, line, words):
    with pytest.raises(ConfigError) as excinfo:
        build(make_layer, type_name, params)
    check_error(excinfo, line, "drop", words)


def test_a_params_section_is_required(make_layer):
    layer = make_layer("[drop]\ntype=dropout\ninputs=in\n", [FakeInput(outputs=DIM)])
    assert layer.needs_params
    with pytest.raises(ConfigError, match="layer 'drop': .*requires extra parameters"):
        layer.read_params(None, "params.cfg")


def test_dropout_takes_one_input(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer("[drop]\ntype=dropout\ninputs=a,b\n",
                   [FakeInput("a", outputs=4), FakeInput("b", outputs=4)])
    check_error(excinfo, 3, "drop", "takes 1 input")
