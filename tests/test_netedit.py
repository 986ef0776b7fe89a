"""--conv-to-local, --unshare-weights (netedit.py) and --test-out (spec §3.2, §4.5, §12.2) on
saved tiny nets, run through the trainer in-process."""

import shutil

import numpy as np
import pytest
import torch

from distconvnet import checkpoint
from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet
from test_test_only import INNER, outputs, printed_test_output, read_pickle, views
from trainer_fixtures import TINY_DEF, TINY_PARAMS, TinyRun, run_in_process, tiny_args

GRID = [(y, x) for y in (0, 1, 2) for x in (0, 1, 2)]


@pytest.fixture()
def saved(tiny_run, tmp_path):
    copy = tmp_path / "ConvNet__saved"
    shutil.copytree(tiny_run.run_dir, copy)
    return copy


def rebuilt(state):
    dims = {0: 3 * INNER * INNER, 1: 1}
    model = ConvNet("(checkpoint)", "(checkpoint)", BuildContext(dims.__getitem__, 10),
                    layer_def_text=state["layer_def"], layer_params_text=state["layer_params"])
    model.load_state_dict(state["model"])
    return model.eval()


def test_conv_to_local_keeps_the_outputs(saved):
    status, before, stderr = run_in_process(["--load-file", saved, "--test-only", "1"])
    assert status == 0, stderr
    old_net = rebuilt(checkpoint.load_state(saved))
    status, after, stderr = run_in_process(["--load-file", saved, "--test-only", "1",
                                            "--conv-to-local", "conv1", "--force-save", "1"])
    assert status == 0, stderr
    assert "Converted layer 'conv1' from conv to local" in after.splitlines()
    np.testing.assert_allclose(printed_test_output(after), printed_test_output(before),
                               atol=1e-5)
    state = checkpoint.load_state(saved)
    assert state["options"]["values"]["conv_to_local"] == []          # not applied again on resume
    new_net = rebuilt(state)
    assert new_net.layers["conv1"].type_name == "local"
    assert "sumWidth" not in state["layer_def"].split("[conv1]")[1].split("[pool1]")[0]
    x = [torch.randn(16, 3, INNER, INNER), torch.zeros(16)]
    with torch.no_grad():
        np.testing.assert_allclose(new_net(x, keep=["probs"]).acts["probs"],
                                   old_net(x, keep=["probs"]).acts["probs"], atol=1e-5)


def test_unshare_weights_makes_the_matrices_independent(digit_cifar, tmp_path):
    """fc10b reuses fc10's matrix; once unshared, one more epoch moves the two apart (the sum
    weighs them 1 and 0.5: equal weights would get equal gradients and stay equal)."""
    layer_def = tmp_path / "layers-shared.cfg"
    layer_def.write_text(TINY_DEF.read_text().replace(
        "[probs]\ntype=softmax\ninputs=fc10",
        "[fc10b]\ntype=fc\ninputs=local2\noutputs=10\nweightSource=fc10\n\n"
        "[both]\ntype=eltsum\ninputs=fc10,fc10b\n\n"
        "[probs]\ntype=softmax\ninputs=both"))
    layer_params = tmp_path / "layer-params-shared.cfg"
    layer_params.write_text(TINY_PARAMS.read_text() + "\n[fc10b]\nepsW=0.01\nepsB=0.02\n"
                            "momW=0.9\nmomB=0.9\nwc=0.0005\n\n[both]\ncoeffs=1,0.5\n")
    argv = tiny_args(digit_cifar, tmp_path / "runs", "--train-range", "1-2", "--epochs", "1",
                     "--seed", "3", layer_def=layer_def, layer_params=layer_params)
    status, stdout, stderr = run_in_process(argv)
    assert status == 0, stderr
    run_dir = next((tmp_path / "runs").iterdir())
    first = checkpoint.load_state(run_dir)["model"]
    assert torch.equal(first["layers.fc10.weights.0"], first["layers.fc10b.weights.0"])
    status, stdout, stderr = run_in_process(["--load-file", run_dir, "--epochs", "2",
                                             "--unshare-weights", "fc10b[0]"])
    assert status == 0, stderr
    assert "Unshared weight matrix 0 of layer 'fc10b'" in stdout.splitlines()
    state = checkpoint.load_state(run_dir)
    assert "weightSource" not in state["layer_def"]
    assert state["options"]["values"]["unshare_weights"] == []
    w, wb = state["model"]["layers.fc10.weights.0"], state["model"]["layers.fc10b.weights.0"]
    assert not torch.equal(w, wb)
    assert not torch.equal(w, first["layers.fc10.weights.0"])


def test_test_out_writes_the_averaged_probabilities(saved, digit_cifar, tmp_path):
    target = tmp_path / "preds"
    status, _, stderr = run_in_process(["--load-file", saved, "--test-only", "1",
                                        "--multiview-test", "1", "--test-out", target,
                                        "--logreg-name", "logprob"])
    assert status == 0, stderr
    net = rebuilt(checkpoint.load_state(saved))
    for batchnum in TinyRun.TEST_RANGE:
        written = read_pickle(target / f"test_preds_{batchnum}")
        assert written["note"].startswith("generated from ") and str(saved) in written["note"]
        probs = written["data"]
        assert probs.dtype == np.float32 and probs.shape == (64, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        crops, _ = views(digit_cifar, batchnum, GRID)
        np.testing.assert_allclose(probs, outputs(net, crops, "probs"), atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--multiview-test", "1", "--logreg-name", "probs"],
     "'probs' is not a cost.logreg layer of this net (cost.logreg layers: logprob)"),
    (["--logreg-name", "logprob"], "requires option --multiview-test"),
])
def test_test_out_checks_its_options(saved, tmp_path, extra, message):
    status, _, stderr = run_in_process(["--load-file", saved, "--test-only", "1",
                                        "--test-out", tmp_path / "preds", *extra])
    assert status != 0 and message in stderr
