"""The user's page (TrainingExample.md): its CIFAR-10 command runs verbatim, paths changed, on
the CPU and learns; a saved model is evaluated with `--test-only 1`; its ImageNet command runs
verbatim, paths and ranges changed, on batches of real photographs; and the model summary of
the ImageNet net has the geometry and parameter count of spec §14.1."""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

from distconvnet import cli
from distconvnet.providers.batches import load_meta, write_meta
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


def load_data_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module            # so make_batches' pool can pickle its worker by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.dali
def test_the_imagenet_command_verbatim_on_photographs(tmp_path, monkeypatch, capsys):
    """Crops of the photos bundled with scikit-learn and matplotlib, made into 256x256 JPEG
    batches by data/make_batches.py: training batches 0 and 1 and validation batch 1000, of 16
    images each. The AlexNet-sized net takes 224x224 crops with colour noise: on the CPU with
    DALI's CPU decoder in CI, on the GPU with the mixed decoder where there is one."""
    photos, batches = tmp_path / "photos", tmp_path / "ilsvrc-2012-batches"
    load_data_tool("make_sample_photos").main(["--tgt", str(photos), "--train", "32",
                                              "--val", "16"])
    assert load_data_tool("make_batches").main(["--src-dir", str(photos), "--tgt-dir",
                                                str(batches), "--batch-size", "16",
                                                "--jobs", "2"]) == 0
    assert sorted(path.name for path in batches.iterdir()) == [
        "batches.meta", "data_batch_0", "data_batch_1", "data_batch_1000"]
    # The net's 1000-way softmax must match the data's classes: the photos' three classes are
    # the first of ILSVRC's thousand (folders for all would make 1000 images).
    meta = load_meta(batches)
    meta["label_names"] += [f"unused{k}" for k in range(len(meta["label_names"]), 1000)]
    write_meta(batches, meta)
    capsys.readouterr()
    monkeypatch.chdir(REPO)                 # the command's layers/... paths are relative
    command = (f"--data-path {batches} --train-range 0-1 --test-range 1000 "
               f"--save-path {tmp_path}/tmp  --epochs 1 "
               f"--layer-def layers/layers-imagenet-1gpu.cfg "
               f"--layer-params layers/layer-params-imagenet-1gpu.cfg --data-provider image "
               f"--inner-size 224 --gpu 0 --mini 128 --test-freq 201 --color-noise 0.1")
    status, stdout, stderr = run_in_process(command.split())
    assert status == 0, stderr
    lines = stdout.splitlines()
    fallback = "No CUDA device is available: running on the CPU."
    assert lines.count(fallback) == (0 if torch.cuda.is_available() else 1)
    assert "Initialized data layer 'data', producing 150528 outputs" in lines
    assert batch_ids(stdout) == ["1.0", "1.1"]
    assert len(event_costs(stdout)) == 1
    assert Path(run_dir_of(stdout)).is_dir()


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
                           "--layer-params", "layers/layer-params-imagenet-1gpu.cfg",
                           "--inner-size", "224"])
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
    assert lines[0] == "Input: 224x224 3-channel images (from --inner-size)"
    assert all(line.startswith("Initialized ") for line in lines[1:-1])
    assert imagenet_1gpu_parameters() == 61_100_840
    assert lines[-1] == f"Trainable parameters: {imagenet_1gpu_parameters():,}"
