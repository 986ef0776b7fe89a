"""`python -m distconvnet.bench`: our trainer against what a user would write instead, side by
side in one run on one card, one line per comparison:

    <name>: ours X img/s, peer Y img/s, ratio Z

(a) imagenet-1gpu train step on synthetic input: ours vs a plain eager fp32 PyTorch script of the
    same net, and vs the same script with bf16 + channels_last + torch.compile;
(b) JPEG batches to updates (with --jpeg-dir, batches made by data/make_batches.py; in
    bench_jpeg.py): the provider alone vs the bare DALI decode+crop+normalise pipeline (the
    ceiling); per --mini (128 and 512), the trainer's loop on the JPEG batches against the slower
    of its two parts, the step alone on the same --mini and the provider alone, with the share of
    the time spent waiting for data and the share of the GPU's time idle; and ours vs the plain
    script fed by a PIL DataLoader on all cores;
(c) cifar10-11pct: ours vs the plain eager script;
(d) the peak GPU memory of each run, printed in its line.

"Ours" is the trainer's own Run (run.build_run) of the net, fed by SyntheticBatches or the image
provider, so that what is measured is what users get.
"""

import argparse
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath, knobs
from .layers import conv
from .providers import DataBatch
from .providers.batches import CursorProvider
from .run import build_run
from .runplan import plan_run
from .train import train_on_batch

LAYERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layers")


# -- the peers: what a user would write by hand ---------------------------------------------------

class PlainImagenetNet(nn.Module):
    """The imagenet-1gpu net (spec §14.1) as a plain PyTorch script would write it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier(self.features(x))


class LocallyConnected(nn.Module):
    """The usual hand-written unshared convolution: unfold + einsum."""

    def __init__(self, channels, filters, size, kernel, padding):
        super().__init__()
        self.kernel, self.padding, self.size = kernel, padding, size
        self.weight = nn.Parameter(torch.randn(size * size, channels * kernel * kernel, filters)
                                   * 0.04)
        self.bias = nn.Parameter(torch.zeros(filters, size, size))

    def forward(self, x):
        cols = F.unfold(x, self.kernel, padding=self.padding)           # N, C·k², L
        out = torch.einsum("ncl,lcf->nfl", cols, self.weight)
        return out.reshape(x.shape[0], -1, self.size, self.size) + self.bias


class PlainCifarNet(nn.Module):
    """The cifar10-11pct net (spec §14.2) as a plain script would write it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.LocalResponseNorm(9, 0.001 * 9 / 9, 0.75, 1.0),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), nn.LocalResponseNorm(9, 0.001, 0.75, 1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            LocallyConnected(64, 64, 6, 3, 1), nn.ReLU(), LocallyConnected(64, 32, 6, 3, 1),
            nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 10))

    def forward(self, x):
        return self.net(x)


def plain_step(model, optimizer, autocast):
    def step(images, labels):
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# -- ours: the trainer's own run -----------------------------------------------------------------

class SyntheticBatches(CursorProvider):
    """A provider (providers.batches.Provider) serving one batch of tensors on the device over
    and over: the training step measured without its data's preparation."""

    def __init__(self, mats, dims, classes):
        super().__init__([1], 1, None)
        self.batch_meta, self.mats, self.dims, self.classes = {}, mats, dims, classes

    def get_next_batch(self):
        epoch, batchnum = self._cursor.advance()
        return DataBatch(epoch, batchnum, self.mats, 1)

    def get_data_dims(self, idx=0):
        return self.dims[idx]

    def get_num_classes(self):
        return self.classes

    def num_cases(self, batchnum):
        return self.mats[0].shape[0]


def our_run(layer_def, layer_params, data, device, mini, args):
    """The trainer's own Run (run.build_run) of a net on `data`, holding no run directory."""
    argv = ["--data-provider", "synthetic", "--data-path", "", "--save-path", "",
            "--train-range", "1", "--test-range", "1", "--layer-def", layer_def,
            "--layer-params", layer_params, "--device", device.type,
            "--gpu", str(device.index or 0), "--mini", str(mini),
            "--precision", args.precision, "--compile", args.compile, "--seed", "1"]
    return build_run(plan_run(argv), data=(data, data), saving=False)


def train_batch(run, batch):
    """What the training loop does with a data batch (one process: the batch is whole)."""
    return train_on_batch(run.model, run.strategy, batch, batch.mats[0].shape[0],
                          run.opts.minibatch_size)


# -- timing ---------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run_once, images_per_run, device, warmup, repeats):
    """Images/s of run_once (median of `repeats` timed runs after `warmup`), peak memory in GiB."""
    for _ in range(warmup):
        run_once()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return images_per_run / float(np.median(times)), peak


def line(name, ours, peer, peer_name="peer"):
    (ours_rate, ours_mem), (peer_rate, peer_mem) = ours, peer
    mem = f" (peak GPU memory: ours {ours_mem:.2f} GiB, {peer_name} {peer_mem:.2f} GiB)" \
        if ours_mem or peer_mem else ""
    return (f"{name}: ours {ours_rate:,.0f} img/s, {peer_name} {peer_rate:,.0f} img/s, "
            f"ratio {ours_rate / peer_rate:.2f}{mem}")


def synthetic(batch, size, classes, device, channels_last=False):
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (batch,), device=device)


def bench_net(name, layer_def, layer_params, plain_cls, size, classes, args, device, peers):
    """Train steps on synthetic input: ours vs each requested peer variant."""
    batch, runs = args.batch, args.steps
    images, labels = synthetic(batch * runs, size, classes, device)
    data = SyntheticBatches([images, labels.float()], {0: 3 * size * size, 1: 1}, classes)
    ours = our_run(layer_def, layer_params, data, device, batch, args)
    ours_result = measure(lambda: train_batch(ours, data.get_next_batch()), batch * runs,
                          device, args.warmup, args.repeats)
    out = []
    for peer_name, precision, fast in peers:
        model = plain_cls().to(device)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                              foreach=True)
        if precision == "fp32":
            knobs.float32_exactly(device)
        step = plain_step(torch.compile(model) if fast and device.type == "cuda" else model, opt,
                          fastpath.autocast(device, precision))
        x, y = synthetic(batch, size, classes, device, channels_last=fast)

        def run(step=step, x=x, y=y):
            for _ in range(runs):
                step(x, y)
        out.append(line(f"{name} (batch {batch})", ours_result,
                        measure(run, batch * runs, device, args.warmup, args.repeats), peer_name))
        del model, opt, step
    return out


def header(device, precision):
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    try:
        import nvidia.dali
        dali = nvidia.dali.__version__
    except ImportError:
        dali = "not installed"
    # the rewrite only ever runs under autocast, so an fp32 run is always without it
    space_to_depth = "on" if conv.SPACE_TO_DEPTH and precision != "fp32" else "off"
    queues = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default")
    return (f"distconvnet.bench {time.strftime('%Y-%m-%d')} | device: {card} | torch "
            f"{torch.__version__} | DALI {dali} | ours: {precision}, conv space-to-depth "
            f"{space_to_depth} | CUDA_DEVICE_MAX_CONNECTIONS {queues}")


def main(argv=None):
    knobs.before_cuda()
    parser = argparse.ArgumentParser(prog="python -m distconvnet.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny runs (a smoke test)")
    parser.add_argument("--only", default="a,b,c", help="comma list of parts: a, b, c")
    parser.add_argument("--jpeg-dir", default="", help="batches from data/make_batches.py (b)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "0", "1"])
    parser.add_argument("--threads", type=int, default=8, help="DALI threads")
    parser.add_argument("--minis", default="128,512",
                        help="(b): the --mini values of the JPEG-to-update runs")
    parser.add_argument("--hw-decoder-load", type=float, default=None,
                        help="(b): the share of JPEGs for the hardware decoder (default: the "
                             "image provider's)")
    parser.add_argument("--pil", type=int, default=1, choices=[0, 1],
                        help="(b): also run the plain script with a PIL DataLoader")
    args = parser.parse_args(argv)
    args.minis = [int(m) for m in args.minis.split(",")]
    device = torch.device(args.device)
    knobs.use_own_stream(device)
    args.precision = fastpath.resolve_precision(args.precision, device)
    args.batch = args.batch or (512 if device.type == "cuda" and not args.quick else 8)
    args.steps, args.warmup, args.repeats = (1, 1, 2) if args.quick else (10, 2, 5)
    parts = set(args.only.split(","))
    print(header(device, args.precision), flush=True)
    fast_peer = ("peer bf16+channels_last+compile", "bf16", True)
    eager_peer = ("peer eager fp32", "fp32", False)
    if "a" in parts:
        size = 224
        for text in bench_net("imagenet-1gpu train step, synthetic", os.path.join(
                LAYERS, "layers-imagenet-1gpu.cfg"), os.path.join(
                LAYERS, "layer-params-imagenet-1gpu.cfg"), PlainImagenetNet, size, 1000, args,
                device, [eager_peer, fast_peer] if device.type == "cuda" else [eager_peer]):
            print(text, flush=True)
    if "c" in parts:
        for text in bench_net("cifar10-11pct train step, synthetic", os.path.join(
                LAYERS, "layers-cifar10-11pct.cfg"), os.path.join(
                LAYERS, "layer-params-cifar10-11pct.cfg"), PlainCifarNet, 24, 10, args, device,
                [eager_peer]):
            print(text, flush=True)
    if "b" in parts and args.jpeg_dir:
        from .bench_jpeg import bench_jpeg
        for text in bench_jpeg(args, device):
            print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
