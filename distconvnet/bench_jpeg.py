"""Part (b) of `python -m distconvnet.bench` (see bench.py): JPEG batches to updates.

The image provider alone against the bare DALI decode+crop+normalise pipeline (the ceiling);
per --mini, the trainer's loop on the JPEG batches against the slower of its two parts (the
step alone on synthetic batches, the provider alone), with the share of the time spent waiting
for data and the share of the GPU's time idle; and ours against the plain script fed by a PIL
DataLoader on all cores.
"""

import math
import os
import time
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F

from . import fastpath, knobs
from .bench import (LAYERS, PlainImagenetNet, SyntheticBatches, line, measure, our_run,
                    plain_step, synthetic, train_batch)
from .train import settle_heap


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
        sums, count = train_batch(ours, batch)
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
    _dali()                                # one line naming the [image] extra when it is missing
    from .providers import image
    from .providers.batches import list_batches, load_meta, read_batch
    from . import safepickle

    numbers = [n for n in list_batches(args.jpeg_dir) if n < 1000]
    meta = load_meta(args.jpeg_dir)
    jpegs = [np.frombuffer(safepickle.as_bytes(j), np.uint8)
             for n in numbers for j in read_batch(args.jpeg_dir, n)["data"]]
    if args.hw_decoder_load is not None:
        image.HW_DECODER_LOAD = args.hw_decoder_load

    provider = image_provider(args, device, numbers, args.minis[0])
    provider_rate = measure(lambda: [provider.get_next_batch() for _ in numbers], len(jpegs),
                            device, 1, args.repeats)
    provider.close()
    ceiling = _bare_rate(_bare_pipeline(jpegs, args, device), len(jpegs), device, args.repeats)
    print(line("image provider alone vs bare DALI decode+crop (the ceiling)",
               provider_rate, ceiling, "bare DALI"), flush=True)
    for mini in args.minis:
        text, e2e_rate = jpeg_to_update(args, device, numbers, len(jpegs) // len(numbers),
                                        provider_rate[0], mini)
        print(text, flush=True)
    if not args.pil:
        return []
    return [line(f"JPEG batches to updates, imagenet-1gpu --mini {args.minis[-1]}: ours (DALI) "
                 f"vs plain script + PIL DataLoader", (e2e_rate, 0.0),
                 _pil_script(jpegs, meta, args, device), "PIL script")]


def image_provider(args, device, numbers, mini):
    from .providers import ProviderOptions, make_provider
    options = ProviderOptions(inner_size=224, color_noise=0.1, seed=1, device=device,
                              minibatch=mini)
    return make_provider("image", args.jpeg_dir, numbers, options=options)


def jpeg_to_update(args, device, numbers, per_batch, provider_rate, mini):
    """(line, JPEG-to-update img/s) of the trainer's loop at --mini `mini`."""
    images, labels = synthetic(per_batch, 224, 1000, device)
    data = SyntheticBatches([images, labels.float(), F.one_hot(labels, 1000).float()],
                            {0: 3 * 224 * 224, 1: 1, 2: 1000}, 1000)
    ours = our_run(os.path.join(LAYERS, "layers-imagenet-1gpu.cfg"),
                   os.path.join(LAYERS, "layer-params-imagenet-1gpu.cfg"), data, device,
                   mini, args)
    batches = max(args.repeats, 2) * len(numbers)
    trainer_rate(ours, data.get_next_batch, 2)                      # compile, autotune
    settle_heap()                                                    # as the trainer does
    step_rate, _ = trainer_rate(ours, data.get_next_batch, batches)
    provider = image_provider(args, device, numbers, mini)
    trainer_rate(ours, provider.get_next_batch, len(numbers))       # the decoder's start
    rate, wait = trainer_rate(ours, provider.get_next_batch, batches)
    idle = gpu_idle_share(lambda: trainer_rate(ours, provider.get_next_batch, len(numbers))) \
        if device.type == "cuda" else math.nan
    provider.close()
    idle = "n/a" if math.isnan(idle) else f"{idle:.0%}"
    slower = min(step_rate, provider_rate)
    return (f"JPEG batches to updates, imagenet-1gpu --mini {mini}: ours {rate:,.0f} img/s "
            f"(data wait {wait:.0%}, GPU idle {idle}), step alone {step_rate:,.0f} img/s, "
            f"provider alone {provider_rate:,.0f} img/s: {rate / slower:.2f} of the "
            f"slower part"), rate


def _bare_pipeline(jpegs, args, device):
    """The bare DALI decode+crop+normalise pipeline over the JPEGs, cycled."""
    from nvidia.dali import pipeline_def
    from .providers import image
    fn, _, dtypes = image._dali()
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
    return bare()


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
    knobs.float32_exactly(device)
    step = plain_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      fastpath.autocast(device, "fp32"))

    def run():
        for images, labels in loader:
            step(images.to(device, non_blocking=True), labels.to(device))
    return measure(run, len(loader) * 128, device, 1, args.repeats)
