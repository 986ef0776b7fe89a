"""The image provider's tests' data set and reference (test_image.py, test_image_inputs.py)."""

import importlib.util
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distconvnet.providers import ProviderOptions, make_provider
from distconvnet.providers.batches import (batch_generator, load_meta, read_batch, write_batch,
                                           write_meta)

TOOL_PATH = Path(__file__).resolve().parents[2] / "data" / "make_batches.py"
INNER = 24


def smooth_jpeg(seed, width, height):
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC).save(
        out, "JPEG", quality=95)
    return out.getvalue()


def image_batches(root):
    """make_batches output in `root`/batches: training batches 0, 1 (4 images of 32x32, sub-files
    of 3), validation batch 1000; plus hand-made batch 5 (non-square images, several/no
    labels)."""
    for k in range(8):
        path = root / "src" / "train" / f"class{k % 3}" / f"img{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(smooth_jpeg(k, 40 + 4 * k, 36))
    for k in range(3):
        path = root / "src" / "val" / f"class{k}" / f"val{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(smooth_jpeg(50 + k, 36, 44))
    spec = importlib.util.spec_from_file_location("make_batches", TOOL_PATH)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["make_batches"] = tool
    spec.loader.exec_module(tool)
    out = root / "batches"
    assert tool.main(["--src-dir", str(root / "src"), "--tgt-dir", str(out), "--batch-size", "4",
                      "--sub-batch-size", "3", "--image-size", "32", "--jobs", "2"]) == 0
    # Short side 32 = the batches' image size, as the original asserted of every image.
    odd = [smooth_jpeg(20 + k, width, height)
           for k, (width, height) in enumerate([(40, 32), (32, 37), (45, 32), (32, 34)])]
    write_batch(out, 5, {"data": odd, "labels": [[0, 2], [], [1], [2, 1, 0]]}, sub_batch_size=3)
    return out


def provider(path, batch_range=(0, 1), **kw):
    option_names = set(ProviderOptions.__dataclass_fields__)
    options = ProviderOptions(**{k: v for k, v in kw.items() if k in option_names})
    rest = {k: v for k, v in kw.items() if k not in option_names}
    return make_provider("image", path, list(batch_range), options=options, **rest)


def pil_decode(jpegs):
    return [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64) for jpeg in jpegs]


def reference(path, batchnum, *, epoch=1, seed=0, mode="train", color_noise=0.0,
              scalar_mean=-1.0, shift=0, decode=pil_decode):
    """(images (N*V, 3, inner, inner) float64, labels (N*V,)) from the documented draws, on the
    JPEGs as `decode` (PIL by default) decodes them."""
    batch, meta = read_batch(path, batchnum), load_meta(path)
    n = len(batch["data"])
    g = batch_generator(seed, epoch, batchnum)
    crop = torch.rand((n, 2), generator=g, dtype=torch.float64).numpy()
    flip = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).numpy()
    alpha = torch.randn((n, 3), generator=g, dtype=torch.float64).numpy()
    pick = torch.rand(n, generator=g, dtype=torch.float64).numpy()
    size = math.isqrt(meta["num_vis"] // 3)
    b = (size - INNER) // 2
    mean = meta["data_mean"].reshape(3, size, size).astype(np.float64)[:, b:b + INNER,
                                                                       b:b + INNER]
    if scalar_mean >= 0:
        mean = scalar_mean
    stdevs, eigvecs = meta["color_pca"]
    views, labels = [], []
    for i, image in enumerate(decode(batch["data"])):
        image = image.transpose(2, 0, 1)
        free_x, free_y = image.shape[2] - INNER, image.shape[1] - INNER
        if mode == "train":
            origins = [(int(crop[i, 0] * (free_x + 1)), int(crop[i, 1] * (free_y + 1)))]
            flips = [flip[i]]
        elif mode == "test":
            origins, flips = [(free_x // 2 + shift, free_y // 2)], [False]
        else:
            corners = [(0, 0), (free_x, 0), (free_x // 2, free_y // 2), (0, free_y),
                       (free_x, free_y)]
            origins, flips = corners * 2, [False] * 5 + [True] * 5
        cases = []
        for (x, y), mirrored in zip(origins, flips):
            view = image[:, y:y + INNER, x:x + INNER]
            view = (view[:, :, ::-1] if mirrored else view) - mean
            if color_noise > 0:
                noise = eigvecs @ (alpha[i] * stdevs)
                view = (view + color_noise * noise[:, None, None]) / (1 + color_noise)
            cases.append(view)
        views.append(cases)
        options = batch["labels"][i]
        labels.append(options[int(pick[i] * len(options))] if options else -1)
    stacked = np.stack([views[i][v] for v in range(len(views[0])) for i in range(n)])
    return stacked, np.tile(np.array(labels, np.float64), len(views[0]))


def corrupt_quantisation_table(jpeg):
    """Intact markers and sizes, but the first component names an undefined table: only a real
    decode finds it (DALI fails the batch; PIL fails the image)."""
    pos = 2
    while jpeg[pos + 1] != 0xC0:
        pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
    return jpeg[:pos + 12] + b"\x03" + jpeg[pos + 13:]


def write_bad_batches(data, tmp_path):
    """Batch 7: image 4 (sub-file .1, image 1) truncated; batch 8: image 2 undecodable; and the
    good images they were made of."""
    target = tmp_path / "bad"
    write_meta(target, load_meta(data))
    good = read_batch(data, 0)["data"] + read_batch(data, 1)["data"][:2]
    truncated = good[:4] + [good[4][:200]] + good[5:]
    write_batch(target, 7, {"data": truncated, "labels": [[k % 3] for k in range(6)]},
                sub_batch_size=3)
    undecodable = good[:2] + [corrupt_quantisation_table(good[2])] + good[3:]
    write_batch(target, 8, {"data": undecodable, "labels": [[k % 3] for k in range(6)]},
                sub_batch_size=3)
    return target, good
