"""`python -m distconvnet.bench`: our trainer against what a user would write instead, side by
side in one run on one card, one line per comparison:

    <name>: ours X img/s, peer Y img/s, ratio Z

(a) imagenet-1gpu train step on synthetic input: ours vs a plain eager fp32 PyTorch script of the
    same net, and vs the same script with bf16 + channels_last + torch.compile;
(b) JPEG batches to updates (with --jpeg-dir, batches made by data/make_batches.py): the provider
    alone vs the bare DALI decode+crop+normalise pipeline (the ceiling); per --mini (128 and
    512), the trainer's loop on the JPEG batches against the slower of its two parts, the step
    alone on the same --mini and the provider alone, with the share of the time spent waiting
    for data and the share of the GPU's time idle; and ours vs the plain script fed by a PIL
    DataLoader on all cores;
(c) cifar10-11pct: ours vs the plain eager script;
(d) the peak GPU memory of each run, printed in its line.
"""

import argparse
import math
import os
import platform
import time
import types
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .layers import BuildContext, conv
from .model import ConvNet
from .optim import Ccn2SGD
from .train import settle_heap, train_on_batch

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


# -- ours: the trainer's own step -----------------------------------------------------------------

def our_session(layer_def, layer_params, dims, classes, device, mini, precision, compile_model):
    """The pieces of a training Session that a step touches, built the way Session builds them."""
    model = ConvNet(layer_def, layer_params, BuildContext(dims.__getitem__, classes))
    model = fastpath.place(model, device)
    fused = compile_model and device.type == "cuda"
    optimizer = Ccn2SGD(model.weight_layers(), mini, fused=fused)
    forward, autocast = fastpath.forward_fn(model, compile_model), \
        fastpath.autocast(device, precision)
    return types.SimpleNamespace(
        model=model, optimizer=optimizer, forward=forward, autocast=autocast,
        train_step=fastpath.train_step(forward, optimizer, autocast,
                                       graphs=fused and optimizer.updates_every_step()),
        pass_schedule=None,
        minibatches=lambda batch: ([m[i:i + mini] for m in batch.mats]
                                   for i in range(0, batch.mats[0].shape[0], mini)))


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
    dims = {0: 3 * size * size, 1: 1}
    ours = our_session(layer_def, layer_params, dims, classes, device, batch, args.precision,
                       fastpath.resolve_compile(args.compile, device))
    images, labels = synthetic(batch * runs, size, classes, device)
    batch_obj = types.SimpleNamespace(mats=[images, labels.float()])
    ours_result = measure(lambda: train_on_batch(ours, batch_obj), batch * runs, device,
                          args.warmup, args.repeats)
    out = []
    for peer_name, precision, fast in peers:
        model = plain_cls().to(device)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                              foreach=True)
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


# -- (b) JPEG batches -----------------------------------------------------------------------------

def host_read(sums):
    """The costs of a data batch read on the host, as the trainer reads them to print a line."""
    return torch.cat([v.detach().double().flatten() for v in sums.values()]).tolist()


def trainer_rate(ours, next_batch, batches):
    """(img/s, share of the time spent waiting for data) of the training loop's work per data
    batch: take a batch, train on it, read its costs on the host."""
    waiting, cases = 0.0, 0
    start = time.perf_counter()
    for _ in range(batches):
        asked = time.perf_counter()
        batch = next_batch()
        waiting += time.perf_counter() - asked
        sums, count = train_on_batch(ours, batch)
        host_read(sums)
        cases += count
    total = time.perf_counter() - start
    return cases / total, waiting / total


def gpu_idle_share(run):
    """The share of the time between the first kernel and the last one of `run()` in which no
    kernel or copy of this process (the step's, DALI's) runs on the GPU, from a profile."""
    from torch.profiler import ProfilerActivity, profile
    from torch.autograd import DeviceType
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return math.nan
    busy, (lo, hi) = 0.0, spans[0]
    first = lo
    for a, b in spans[1:]:
        if a > hi:
            busy, lo = busy + hi - lo, a
        hi = max(hi, b)
    busy += hi - lo
    return 1.0 - busy / (hi - first)


def bench_jpeg(args, device):
    from .providers.image import _dali
    fn, _, dtypes = _dali()                # one line naming the [image] extra when it is missing
    from nvidia.dali import pipeline_def
    from .providers import ProviderOptions, make_provider
    from .providers.batches import list_batches, load_meta, read_batch
    from . import safepickle

    numbers = [n for n in list_batches(args.jpeg_dir) if n < 1000]
    meta = load_meta(args.jpeg_dir)
    jpegs = [np.frombuffer(safepickle.as_bytes(j), np.uint8)
             for n in numbers for j in read_batch(args.jpeg_dir, n)["data"]]
    total = len(jpegs)
    per_batch = total // len(numbers)

    from .providers import image
    if args.hw_decoder_load is not None:
        image.HW_DECODER_LOAD = args.hw_decoder_load

    def image_provider(mini):
        options = ProviderOptions(inner_size=224, color_noise=0.1, seed=1, device=device,
                                  minibatch=mini)
        return make_provider("image", args.jpeg_dir, numbers, options=options)

    provider = image_provider(args.minis[0])
    provider_run = lambda: [provider.get_next_batch() for _ in numbers]  # noqa: E731
    provider_rate = measure(provider_run, total, device, 1, args.repeats)
    provider.close()

    on_cuda = device.type == "cuda"

    @pipeline_def(batch_size=256, num_threads=args.threads,
                  device_id=(device.index or 0) if on_cuda else None, prefetch_queue_depth=2)
    def bare():
        data = fn.external_source(source=_cycle(jpegs, 256), dtype=dtypes.UINT8)
        images = fn.decoders.image(data, output_type=dtypes.RGB, **(
            {"device": "mixed", "hw_decoder_load": image.HW_DECODER_LOAD} if on_cuda
            else {"device": "cpu"}))
        return fn.crop_mirror_normalize(images, crop=(224, 224),
                                        crop_pos_x=fn.random.uniform(range=[0, 1]),
                                        crop_pos_y=fn.random.uniform(range=[0, 1]),
                                        mirror=fn.random.coin_flip(), dtype=dtypes.FLOAT,
                                        mean=[124.0, 117.0, 104.0], std=[1.0, 1.0, 1.0])
    ceiling = _bare_rate(bare(), total, device, args.repeats)
    print(line("image provider alone vs bare DALI decode+crop (the ceiling)",
               provider_rate, ceiling, "bare DALI"), flush=True)

    def jpeg_to_update(mini):
        """(line, JPEG-to-update img/s) of the trainer's loop at --mini `mini`."""
        ours = our_session(os.path.join(LAYERS, "layers-imagenet-1gpu.cfg"),
                           os.path.join(LAYERS, "layer-params-imagenet-1gpu.cfg"),
                           {0: 3 * 224 * 224, 1: 1, 2: 1000}, 1000, device, mini,
                           args.precision, fastpath.resolve_compile(args.compile, device))
        images, labels = synthetic(per_batch, 224, 1000, device)
        synthetic_batch = types.SimpleNamespace(
            mats=[images, labels.float(), F.one_hot(labels, 1000).float()])
        batches = max(args.repeats, 2) * len(numbers)
        trainer_rate(ours, lambda: synthetic_batch, 2)                  # compile, autotune
        settle_heap()                                                    # as the trainer does
        step_rate, _ = trainer_rate(ours, lambda: synthetic_batch, batches)
        provider = image_provider(mini)
        trainer_rate(ours, provider.get_next_batch, len(numbers))       # the decoder's start
        rate, wait = trainer_rate(ours, provider.get_next_batch, batches)
        idle = gpu_idle_share(lambda: trainer_rate(ours, provider.get_next_batch, len(numbers))) \
            if device.type == "cuda" else math.nan
        provider.close()
        idle = "n/a" if math.isnan(idle) else f"{idle:.0%}"
        slower = min(step_rate, provider_rate[0])
        return (f"JPEG batches to updates, imagenet-1gpu --mini {mini}: ours {rate:,.0f} img/s "
                f"(data wait {wait:.0%}, GPU idle {idle}), step alone {step_rate:,.0f} img/s, "
                f"provider alone {provider_rate[0]:,.0f} img/s: {rate / slower:.2f} of the "
                f"slower part"), rate

    for mini in args.minis:
        text, e2e_rate = jpeg_to_update(mini)
        print(text, flush=True)
    if not args.pil:
        return []
    return [line(f"JPEG batches to updates, imagenet-1gpu --mini {args.minis[-1]}: ours (DALI) "
                 f"vs plain script + PIL DataLoader", (e2e_rate, 0.0),
                 _pil_script(jpegs, meta, args, device), "PIL script")]


def _bare_rate(pipe, total, device, repeats):
    pipe.build()
    iters = max(1, total // 256)
    return measure(lambda: [pipe.run() for _ in range(iters)], iters * 256, device, 1, repeats)


def _cycle(jpegs, batch):
    def source():
        i = 0
        while True:
            yield [jpegs[(i + k) % len(jpegs)] for k in range(batch)]
            i += batch
    return source()


class _JpegDataset(torch.utils.data.Dataset):
    def __init__(self, jpegs, mean):
        self.jpegs, self.mean = jpegs, mean

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        from PIL import Image
        image = np.asarray(Image.open(BytesIO(self.jpegs[i].tobytes())).convert("RGB"))
        y = np.random.randint(0, image.shape[0] - 223)
        x = np.random.randint(0, image.shape[1] - 223)
        crop = image[y:y + 224, x:x + 224]
        if np.random.rand() < 0.5:
            crop = crop[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
        return tensor - self.mean, 0


def _pil_script(jpegs, meta, args, device):
    mean = torch.tensor([124.0, 117.0, 104.0]).view(3, 1, 1)
    loader = torch.utils.data.DataLoader(_JpegDataset(jpegs, mean), batch_size=128, shuffle=True,
                                         num_workers=os.cpu_count(), pin_memory=True,
                                         persistent_workers=True, drop_last=True)
    model = PlainImagenetNet().to(device)
    step = plain_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      fastpath.autocast(device, "fp32"))

    def run():
        for images, labels in loader:
            step(images.to(device, non_blocking=True), labels.to(device))
    return measure(run, len(loader) * 128, device, 1, args.repeats)


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
    fastpath.spread_work_queues()
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
    fastpath.use_own_stream(device)
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
        for text in bench_jpeg(args, device):
            print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
