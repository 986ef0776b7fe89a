"""The user's page (TrainingExample.md): its CIFAR-10 command runs verbatim, paths changed, on
the CPU and learns; a saved model is evaluated with `--test-only 1`; and the model summary of
the ImageNet net has the geometry and parameter count of spec §14.1."""

import contextlib
import io

import pytest

from distconvnet import cli
from trainer_fixtures import (REPO, batch_ids, event_costs, run_dir_of, run_in_process,
                              write_digit_cifar)


@pytest.mark.slow
def test_the_cifar_command_verbatim_learns_on_the_cpu(tmp_path, monkeypatch):
    """32x32 digit images in the py-colmajor layout, 6 batches of 256; `--gpu 0` on a machine
    without CUDA says so once and trains on the CPU."""
    data = write_digit_cifar(tmp_path / "cifar-10-py-colmajor", cases=256, img_size=32)
    monkeypatch.chdir(REPO)                 # the command's layers/... paths are relative
    command = (f"--data-provider cifar --test-range 6 --train-range 1-5 --data-path {data} "
               f"--inner-size 24 --save-path {tmp_path}/ --gpu 0 "
               f"--layer-def layers/layers-cifar10-11pct.cfg "
               f"--layer-params layers/layer-params-cifar10-11pct.cfg --epochs 2 --test-freq 5")
    status, stdout, stderr = run_in_process(command.split())
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert lines.count("No CUDA device is available: running on the CPU.") == 1
    assert "Running on the CPU" in lines
    assert "Initialized convolutional layer 'conv1' on GPUs 0, producing 24x24 64-channel " \
           "output" in lines
    assert batch_ids(stdout) == [f"{e}.{b}" for e in (1, 2) for b in range(1, 6)]
    events = event_costs(stdout)
    assert len(events) == 2
    assert events[-1][1] < events[0][1], f"the test error did not fall: {events}"

    # The page's evaluation command on the saved model: the whole test range is batch 6, so
    # it reproduces the last test event's numbers.
    status, tested, stderr = run_in_process(["--load-file", run_dir_of(stdout),
                                             "--test-only", "1"])
    assert status == 0, stderr
    assert event_costs(tested) == [events[-1]]


def imagenet_1gpu_parameters():
    """spec §14.1 by hand: conv 64-192-384-256-256 (11, 5, 3, 3, 3), fc 4096-4096-1000."""
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    fcs = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]
    return (sum(c_in * c_out * k * k + c_out for c_in, c_out, k in convs)
            + sum(n_in * n_out + n_out for n_in, n_out in fcs))


def test_summary_of_the_imagenet_net(monkeypatch):
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["summary", "--layer-def", "layers/layers-imagenet-1gpu.cfg",
                           "--layer-params", "layers/layer-params-imagenet-1gpu.cfg"])
    assert status == 0
    lines = out.getvalue().splitlines()
    for expected in [
            "Initialized data layer 'data', producing 150528 outputs",
            "Initialized convolutional layer 'conv1' on GPUs 0, producing 55x55 64-channel "
            "output",
            "Initialized max-pooling layer 'pool1' on GPUs 0, producing 27x27 64-channel output",
            "Initialized convolutional layer 'conv2' on GPUs 0, producing 27x27 192-channel "
            "output",
            "Initialized max-pooling layer 'pool2' on GPUs 0, producing 13x13 192-channel "
            "output",
            "Initialized max-pooling layer 'pool3' on GPUs 0, producing 6x6 256-channel output",
            "Initialized fully-connected layer 'fc4096a' on GPUs 0, producing 4096 outputs",
            "Initialized fully-connected layer 'fc1000' on GPUs 0, producing 1000 outputs",
            "Initialized logistic regression cost 'logprob' on GPUs 0"]:
        assert expected in lines
    assert all(line.startswith("Initialized ") for line in lines[:-1])
    assert imagenet_1gpu_parameters() == 61_100_840
    assert lines[-1] == f"Trainable parameters: {imagenet_1gpu_parameters():,}"
