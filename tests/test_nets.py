"""Every shipped net in layers/ builds, with the geometry and sizes of spec §14."""

import glob
import os

import pytest
import torch

from distconvnet.cfg import read_cfg
from distconvnet.layers import REGISTRY, BuildContext
from distconvnet.model import ConvNet
from distconvnet.optim import Ccn2SGD, weight_stats

LAYERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layers")
IMAGENET = ({0: 224 * 224 * 3, 1: 1, 2: 1000}, 1000)
CIFAR = ({0: 24 * 24 * 3, 1: 1}, 10)
TINY = ({0: 3 * 8 * 8, 1: 1}, 10)

# name -> (data dims and classes, {layer: (channels, size) or outputs}, parameter count)
# The ImageNet counts, by hand: conv1..5 2,469,696; fc 9216·4096 + 4096·4096 + 4096·1000
# + biases = 58,631,144; the hybrid nets split the same fc layers two or four ways, so the
# same sum.
# The two-tower net: convs 2 × 1,167,040, fc 37,752,832 + 16,781,312 + 4,097,000.
# CIFAR: conv 4,864 + 102,464; local 36 modules × 576 × (64 | 32) + untied biases
# 1,329,408 + 664,704; fc10 11,530. Tiny: 448 + 16 × 144 × 16 + 256 + 2,570.
NETS = {
    "imagenet-1gpu": (IMAGENET, {"conv1": (64, 55), "rnorm1": (64, 55), "pool1": (64, 27),
                                 "conv2": (192, 27), "pool2": (192, 13), "conv3": (384, 13),
                                 "conv5": (256, 13), "pool3": (256, 6), "fc4096a": 4096,
                                 "fc1000": 1000}, 61_100_840),
    "imagenet-2gpu-data": (IMAGENET, {"conv1": (64, 55), "pool3": (256, 6), "fc1000": 1000},
                           61_100_840),
    "imagenet-4gpu-data": (IMAGENET, {"conv1": (64, 55), "pool3": (256, 6), "fc1000": 1000},
                           61_100_840),
    "imagenet-4gpu-data-model": (IMAGENET, {"pool3": (256, 6), "fc1024a": 1024, "pass1a": 4096,
                                            "pass1d": 4096, "fc1024bd": 1024, "pass2a": 4096,
                                            "fc1000": 1000}, 61_100_840),
    "imagenet-2gpu-hybrid": (IMAGENET, {"pool3": (256, 6), "fc2048a": 2048, "pass1b": 4096,
                                        "fc2048bb": 2048, "pass2a": 4096, "fc1000": 1000},
                             61_100_840),
    "imagenet-2gpu-model": (IMAGENET, {"conv1a": (48, 55), "pool1b": (48, 27),
                                       "conv2a": (128, 27), "cnorm2b": (128, 27),
                                       "pool2a": (128, 13), "conv3b": (192, 13),
                                       "conv5a": (128, 13), "pool3b": (128, 6), "fc2048a": 2048,
                                       "fc2048bb": 2048, "fc1000": 1000}, 60_965_224),
    "cifar10-11pct": (CIFAR, {"conv1": (64, 24), "pool1": (64, 12), "rnorm1": (64, 12),
                              "conv2": (64, 12), "pool2": (64, 6), "local3": (64, 6),
                              "local4": (32, 6), "fc10": 10}, 2_112_970),
    "tiny": (TINY, {"conv1": (16, 8), "pool1": (16, 4), "rnorm1": (16, 4), "local2": (16, 4),
                    "fc10": 10}, 40_138),
    # tiny-width copies of the multi-GPU structures, for the model-parallel tests
    "test-2gpu-model": (TINY, {}, 26_506),
    "test-4gpu-data-model": (TINY, {}, 11_658),
    "test-2gpu-hybrid": (TINY, {}, 4_250),
}

# replicas (gpu=) of a few layers, as the multi-GPU configs define or inherit them (spec §8)
GPUS = {
    "imagenet-1gpu": {"conv1": [0], "fc4096b": [0], "logprob": [0]},
    "imagenet-2gpu-data": {"conv1": [0, 1], "pool3": [0, 1], "fc4096a": [0, 1],
                           "fc1000": [0, 1], "logprob": [0, 1]},
    "imagenet-4gpu-data": {"conv1": [0, 1, 2, 3], "fc4096b": [0, 1, 2, 3],
                           "logprob": [0, 1, 2, 3]},
    "imagenet-4gpu-data-model": {"conv1": [0, 1, 2, 3], "pool3": [0, 1, 2, 3], "fc1024c": [2],
                                 "pass1b": [1], "fc1024bb": [1], "pass2a": [0], "fc1000": [0],
                                 "logprob": [0]},
    "imagenet-2gpu-hybrid": {"conv1": [0, 1], "pool3": [0, 1], "fc2048b": [1], "pass1a": [0],
                             "fc2048bb": [1], "fc1000": [0], "logprob": [0]},
    "imagenet-2gpu-model": {"conv1a": [0], "conv1b": [1], "conv3b": [1], "fc2048bb": [1],
                            "fc1000": [0], "logprob": [0]},
}


def cfg_paths(name):
    return (os.path.join(LAYERS_DIR, f"layers-{name}.cfg"),
            os.path.join(LAYERS_DIR, f"layer-params-{name}.cfg"))


def build(name, device="meta"):
    """The net of layers/<name>; on the meta device by default: geometry without 61 M randoms."""
    (dims, classes) = NETS[name][0]
    def_path, params_path = cfg_paths(name)
    missing = sorted({sec.str("type") for sec in read_cfg(def_path).sections} - set(REGISTRY))
    if missing:
        pytest.skip(f"layer types not implemented yet: {', '.join(missing)}")
    with torch.device(device):
        return ConvNet(def_path, params_path, BuildContext(lambda i: dims[i], classes))


def test_every_shipped_net_is_covered():
    shipped = {os.path.basename(p)[len("layers-"):-len(".cfg")]
               for p in glob.glob(os.path.join(LAYERS_DIR, "layers-*.cfg"))}
    assert shipped == set(NETS)
    for name in shipped:
        assert os.path.exists(cfg_paths(name)[1]), f"{name} has no layer-params file"


@pytest.mark.parametrize("name", sorted(NETS))
def test_net_builds_with_the_spec_geometry(name):
    model = build(name)
    _, sizes, parameters = NETS[name]
    for layer_name, expected in sizes.items():
        layer = model.layers[layer_name]
        got = (layer.channels, layer.img_size) if isinstance(expected, tuple) else layer.outputs
        assert got == expected, layer_name
    assert model.num_parameters() == parameters
    for layer_name, gpus in GPUS.get(name, {}).items():
        assert model.layers[layer_name].gpus == gpus, layer_name
    assert model.warnings == []       # no unknown keys or stray sections in our own files


def test_imagenet_1gpu_startup_lines():
    lines = build("imagenet-1gpu").init_lines()
    assert lines[:2] == ["Initialized data layer 'data', producing 150528 outputs",
                         "Initialized data layer 'labvec', producing 1 outputs"]
    assert ("Initialized convolutional layer 'conv1' on GPUs 0, producing 55x55 64-channel "
            "output") in lines
    assert "Initialized fully-connected layer 'fc4096a' on GPUs 0, producing 4096 outputs" in lines


def test_tiny_net_trains_a_step_with_the_ccn2_optimizer():
    model = build("tiny", device="cpu")
    torch.manual_seed(0)
    data = torch.randn(16, 3 * 8 * 8)
    labels = torch.randint(0, 10, (16, 1)).float()
    optimizer = Ccn2SGD(model.weight_layers(), minibatch=16)
    before = [p.detach().clone() for p in model.parameters()]
    out = model([data, labels])
    assert torch.isfinite(out.objective)
    out.objective.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    rows = weight_stats(model.weight_layers(), optimizer)
    assert [r[:2] for r in rows] == [("conv1", "weights[0]"), ("conv1", "biases"),
                                     ("local2", "weights[0]"), ("local2", "biases"),
                                     ("fc10", "weights[0]"), ("fc10", "biases")]
    assert all(inc > 0 for *_, inc in rows)
