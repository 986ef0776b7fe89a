"""ImageDataProvider (CPU DALI) against a float64 numpy/PIL reference of spec §10.3.

The data set is made by data/make_batches.py from generated images; the reference recomputes
every draw from the derivation documented in distconvnet/providers/image_plan.py.
"""

import importlib.util
import io
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distconvnet.errors import DataError, OptionError
from distconvnet.providers import ProviderOptions, make_provider
from distconvnet.parallel.sharding import shard_indices
from distconvnet.providers.batches import (batch_generator, load_meta, read_batch, write_batch,
                                           write_meta)

pytestmark = pytest.mark.dali
TOOL_PATH = Path(__file__).resolve().parents[2] / "data" / "make_batches.py"
INNER = 24


def smooth_jpeg(seed, width, height):
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC).save(
        out, "JPEG", quality=95)
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """make_batches output: training batches 0, 1 (4 images of 32x32, sub-files of 3), validation
    batch 1000; plus hand-made batches 5 (non-square images, several/no labels) and 7 (bad)."""
    root = tmp_path_factory.mktemp("image")
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
    odd = [smooth_jpeg(20 + k, 40 - 3 * k, 32 + 2 * k) for k in range(4)]
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


def test_training_batches_match_the_reference_with_colour_noise(data):
    p = provider(data, inner_size=INNER, color_noise=0.1, seed=5)
    for batchnum in (0, 1):
        batch = p.get_next_batch()
        assert (batch.epoch, batch.batchnum, batch.num_views) == (1, batchnum, 1)
        images, labels, hot = batch.mats
        assert images.dtype == torch.float32 and images.shape == (4, 3, INNER, INNER)
        expected, expected_labels = reference(data, batchnum, seed=5, color_noise=0.1)
        np.testing.assert_allclose(images.numpy(), expected, atol=1e-3)
        assert labels.tolist() == expected_labels.tolist()
        assert hot.shape == (4, 3) and hot.argmax(1).tolist() == labels.long().tolist()
        assert hot.sum().item() == 4
    assert p.cursor == (2, 0)


def test_a_one_pixel_shift_would_be_caught(data):
    """The tolerance of these tests is far below what an off-by-one crop origin changes."""
    images = provider(data, [0], test=True, inner_size=INNER).get_next_batch().mats[0].numpy()
    for shift in (-1, 1):
        shifted, _ = reference(data, 0, mode="test", shift=shift)
        assert np.abs(images - shifted).max(axis=(1, 2, 3)).min() > 1.0


def test_test_mode_is_the_centre_crop_with_scalar_mean_or_mean_image(data):
    images = provider(data, [1000], test=True, inner_size=INNER).get_next_batch().mats[0]
    expected, _ = reference(data, 1000, mode="test")
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-3)
    images = provider(data, [1000], test=True, inner_size=INNER, scalar_mean=100.0,
                      color_noise=0.5).get_next_batch().mats[0]
    expected, _ = reference(data, 1000, mode="test", scalar_mean=100.0)
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-3)


def test_multiview_gives_the_ten_views_view_major(data):
    batch = provider(data, [5], test=True, inner_size=INNER, multiview=True).get_next_batch()
    images, labels, hot = batch.mats
    assert batch.num_views == 10 and images.shape == (40, 3, INNER, INNER)
    expected, expected_labels = reference(data, 5, mode="multiview")
    for v in range(10):
        for i in range(4):
            np.testing.assert_allclose(images[4 * v + i].numpy(), expected[4 * v + i],
                                       atol=1e-3, err_msg=f"view {v}, image {i}")
    assert labels.tolist() == expected_labels.tolist()
    assert hot.shape == (40, 3) and hot[:4].tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0],
                                                         [1, 1, 1]]


def test_non_square_images_several_and_no_labels(data):
    p = provider(data, [5], inner_size=INNER, seed=3)
    images, labels, _ = p.get_next_batch().mats
    expected, expected_labels = reference(data, 5, seed=3)
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-3)
    assert labels.tolist() == expected_labels.tolist() and labels[1] == -1
    assert labels[0] in (0, 2) and labels[3] in (0, 1, 2)


def test_same_seed_same_batches_and_resume_is_exact(data):
    run = provider(data, inner_size=INNER, color_noise=0.1, seed=9)
    straight = [run.get_next_batch() for _ in range(4)]
    assert [(b.epoch, b.batchnum) for b in straight] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert not torch.equal(straight[0].mats[0], straight[2].mats[0])   # new epoch, new draws
    first = provider(data, inner_size=INNER, color_noise=0.1, seed=9)
    first.get_next_batch()
    state = first.state_dict()
    resumed = provider(data, inner_size=INNER, color_noise=0.1, seed=9)
    resumed.load_state_dict(state)
    for expected in straight[1:]:
        batch = resumed.get_next_batch()
        assert (batch.epoch, batch.batchnum) == (expected.epoch, expected.batchnum)
        for got, want in zip(batch.mats, expected.mats):
            assert torch.equal(got, want)
    first.load_state_dict({"epoch": 2, "batchnum": 1})          # drops its prefetched batch
    assert torch.equal(first.get_next_batch().mats[0], straight[3].mats[0])
    other = provider(data, inner_size=INNER, color_noise=0.1, seed=10).get_next_batch()
    assert not torch.equal(other.mats[0], straight[0].mats[0])


@pytest.mark.parametrize("dali_batch", [1, 3])
def test_a_batch_decoded_in_several_dali_runs_is_the_same(data, bad_batches, dali_batch):
    """Real data batches take several DALI runs, some in flight at once; the last one short."""
    settings = [dict(batch_range=(0, 1), color_noise=0.1, seed=5),
                dict(batch_range=(1000, 0), test=True, multiview=True),
                dict(batch_range=(7, 8), path=bad_batches[0], test=True, skip_bad_images=True)]
    for kw in settings:
        path = kw.pop("path", data)
        whole = provider(path, inner_size=INNER, **kw)
        runs = provider(path, inner_size=INNER, **kw)
        runs.dali_batch = dali_batch
        for _ in range(3):
            for got, want in zip(runs.get_next_batch().mats, whole.get_next_batch().mats):
                assert torch.equal(got, want)
        assert runs.take_warnings() == whole.take_warnings()
        runs.close()


def test_batches_are_read_and_planned_outside_the_training_process(data, monkeypatch):
    """The reader process does the per-image Python; this process never unpickles a batch."""
    from distconvnet.providers.image_plan import CasePlanner

    def refuse(*args, **kwargs):
        raise AssertionError("a batch was read in the training process")
    monkeypatch.setattr(CasePlanner, "read", refuse)
    p = provider(data, inner_size=INNER, color_noise=0.1, seed=5)
    for batchnum in (0, 1):
        expected, _ = reference(data, batchnum, seed=5, color_noise=0.1)
        np.testing.assert_allclose(p.get_next_batch().mats[0].numpy(), expected, atol=1e-3)
    p.close()


def test_shared_memory_slots_grow_to_the_largest_batch(data, monkeypatch):
    from distconvnet.providers import image_reader
    monkeypatch.setattr(image_reader, "FIRST_SLOT", 64)      # smaller than any batch here
    p = provider(data, inner_size=INNER, color_noise=0.1, seed=5)
    for epoch in (1, 2):
        for batchnum in (0, 1):
            expected, _ = reference(data, batchnum, epoch=epoch, seed=5, color_noise=0.1)
            np.testing.assert_allclose(p.get_next_batch().mats[0].numpy(), expected,
                                       atol=1e-3)
    assert all(slot.size > 64 for slot in p._image_reader._slots)
    p.close()


def test_close_stops_the_reader_processes_and_frees_their_shared_memory(data):
    p = provider(data, inner_size=INNER)
    p.get_next_batch()
    names = [slot.name for slot in p._image_reader._slots]
    children = [process for process, _ in p._image_reader._children]
    assert names and all(child.is_alive() for child in children)
    p.close()
    assert not any(child.is_alive() for child in children)
    assert not any(os.path.exists(f"/dev/shm/{name.lstrip('/')}") for name in names)


def test_a_reader_process_that_dies_is_one_clear_error(data):
    p = provider(data, inner_size=INNER)
    p.get_next_batch()
    for process, _ in p._image_reader._children:
        process.kill()
    with pytest.raises(DataError, match="the image reader process ended unexpectedly"):
        for _ in range(4):
            p.get_next_batch()
    p.close()


def test_jpeg_runs_pad_each_run_to_its_longest_jpeg():
    from distconvnet.providers.image_plan import JpegRuns
    jpegs = [bytes([k + 1]) * n for k, n in enumerate([5, 3, 7, 2, 4])]
    runs = JpegRuns.pack(jpegs, np.array([0, 2, 2, 4, 1]), run_size=2)
    assert runs.runs == [(0, 2, 7), (14, 2, 7), (28, 1, 3)]
    assert runs.lengths.tolist() == [5, 7, 7, 4, 3]
    rows = [bytes(runs.matrix(r)[i, :n]) for r, (_, count, _) in enumerate(runs.runs)
            for i, n in zip(range(count), runs.lengths[2 * r:2 * r + count])]
    assert rows == [jpegs[i] for i in (0, 2, 2, 4, 1)]


def py2_pickle(jpegs, labels):
    """A sub-batch exactly as Python 2's cPickle wrote it: protocol 2, str keys and JPEG data as
    SHORT_BINSTRING/BINSTRING, labels as lists of BININT1."""
    def string(raw):
        if len(raw) < 256:
            return b"U" + bytes([len(raw)]) + raw
        return b"T" + struct.pack("<I", len(raw)) + raw
    out = b"\x80\x02}(" + string(b"data") + b"](" + b"".join(map(string, jpegs)) + b"e"
    out += string(b"labels") + b"](" + b"".join(b"]K" + bytes([v]) + b"a" for v in labels) + b"e"
    return out + b"u."


def test_python2_sub_batch_pickle(data, tmp_path):
    batch = read_batch(data, 1000)
    target = tmp_path / "py2"
    write_meta(target, load_meta(data))
    (target / "data_batch_3").mkdir()
    labels = [label for [label] in batch["labels"]]
    (target / "data_batch_3" / "data_batch_3.0").write_bytes(
        py2_pickle(batch["data"], labels))
    images, got_labels, _ = provider(target, [3], test=True,
                                     inner_size=INNER).get_next_batch().mats
    expected, _ = reference(data, 1000, mode="test")
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-3)
    assert got_labels.tolist() == labels


def corrupt_quantisation_table(jpeg):
    """Intact markers and sizes, but the first component names an undefined table: only a real
    decode finds it (DALI fails the batch; PIL fails the image)."""
    pos = 2
    while jpeg[pos + 1] != 0xC0:
        pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
    return jpeg[:pos + 12] + b"\x03" + jpeg[pos + 13:]


@pytest.fixture
def bad_batches(data, tmp_path):
    """Batch 7: image 4 (sub-file .1, image 1) truncated; batch 8: image 2 undecodable."""
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


@pytest.mark.parametrize("batchnum, where, what", [
    (7, r"data_batch_7\.1: image 1", "truncated JPEG"),
    (8, r"data_batch_8\.0: image 2", "undecodable JPEG")])
def test_bad_jpeg_names_the_sub_file_and_image(bad_batches, batchnum, where, what):
    target, _ = bad_batches
    with pytest.raises(DataError, match=rf"{where}: {what}.*--skip-bad-images"):
        provider(target, [batchnum], test=True, inner_size=INNER).get_next_batch()


@pytest.mark.parametrize("batchnum, bad", [(7, 4), (8, 2)])
def test_skip_bad_images_shows_the_next_good_image(bad_batches, batchnum, bad):
    target, good = bad_batches
    p = provider(target, [batchnum, 7], test=True, inner_size=INNER, skip_bad_images=True,
                 scalar_mean=0.0)
    images, labels, _ = p.get_next_batch().mats
    assert torch.equal(images[bad], images[bad + 1]) and labels[bad] == labels[bad + 1]
    assert not torch.equal(images[bad - 1], images[bad])
    assert p.skipped_images == 1
    [warning] = p.take_warnings()
    assert f"data_batch_{batchnum}" in warning and f"replaced by image {bad + 1}" in warning
    assert p.take_warnings() == []


def test_shards_are_the_rows_of_the_whole_batch(data):
    whole = provider(data, [0], inner_size=INNER, seed=4, minibatch=3).get_next_batch().mats
    for rank in range(2):
        part = provider(data, [0], inner_size=INNER, seed=4, minibatch=3, rank=rank,
                        world_size=2).get_next_batch().mats
        rows = torch.from_numpy(shard_indices(4, 3, rank, 2))
        for got, want in zip(part, whole):
            assert torch.equal(got, want[rows])


def test_contract_dims_and_counts(data):
    p = provider(data, [0, 1, 1000], inner_size=INNER)
    assert p.description == "JPEG-encoded image data provider"
    assert [p.get_data_dims(i) for i in range(3)] == [INNER * INNER * 3, 1, 3]
    assert p.get_num_classes() == 3 and p.label_names == ["class0", "class1", "class2"]
    assert [p.num_cases(n) for n in (0, 1, 1000)] == [4, 4, 3]
    assert provider(data, [0]).get_next_batch().mats[0].shape == (4, 3, 32, 32)


def test_meta_is_checked(data, tmp_path):
    meta = load_meta(data)
    cases = [({"data_mean": meta["data_mean"][:100]}, {}, DataError, "data_mean"),
             ({"color_pca": None}, {"color_noise": 0.1}, DataError, "color_pca"),
             ({"label_names": []}, {}, DataError, "label_names"),
             ({}, {"inner_size": 33}, OptionError, "inner-size 33")]
    for k, (change, options, error, text) in enumerate(cases):
        target = tmp_path / f"meta{k}"
        write_meta(target, {**meta, **change})
        write_batch(target, 0, read_batch(data, 0))
        with pytest.raises(error, match=text):
            provider(target, [0], **options)


def test_label_outside_label_names(data, tmp_path):
    write_meta(tmp_path, load_meta(data))
    write_batch(tmp_path, 0, {"data": read_batch(data, 0)["data"], "labels": [[0], [1], [3], [2]]})
    with pytest.raises(DataError, match=r"data_batch_0: image 2: label \[3\] is not a class"):
        provider(tmp_path, [0]).get_next_batch()


def test_jpeg_size_reads_headers_and_refuses_broken_files():
    from distconvnet.providers.image import jpeg_size
    baseline = smooth_jpeg(1, 40, 28)
    progressive = io.BytesIO()
    Image.open(io.BytesIO(baseline)).save(progressive, "JPEG", progressive=True)
    assert jpeg_size(baseline) == (28, 40) and jpeg_size(progressive.getvalue()) == (28, 40)
    png = io.BytesIO()
    Image.open(io.BytesIO(baseline)).save(png, "PNG")
    for broken, reason in [(baseline[:300], "truncated"), (png.getvalue(), "not a JPEG"),
                           (b"\xff\xd8\xff\xd9", "no usable frame")]:
        with pytest.raises(ValueError, match=reason):
            jpeg_size(broken)


def nvjpeg_decode(jpegs):
    """The JPEGs as DALI's mixed decoder (nvJPEG and the hardware decoder) decodes them."""
    from nvidia.dali import fn, pipeline_def, types
    from distconvnet.providers.image import HW_DECODER_LOAD

    @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=0)
    def decoder():
        data = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in jpegs],
                                  dtype=types.UINT8)
        return fn.decoders.image(data, device="mixed", output_type=types.RGB,
                                 adjust_orientation=False, hw_decoder_load=HW_DECODER_LOAD)
    pipe = decoder()
    pipe.build()
    (images,) = pipe.run()
    images = images.as_cpu()
    return [np.array(images.at(i), np.float64) for i in range(len(jpegs))]


@pytest.mark.gpu
def test_mixed_gpu_decode_matches_the_reference_on_nvjpeg_pixels(data):
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by several levels on these
    small, strongly coloured images (measured: 4.1 on average), so the GPU path is checked
    against the reference computed on nvJPEG's own pixels; a one-pixel shift must still show."""
    device = torch.device("cuda", 0)
    cases = [({"color_noise": 0.1, "seed": 2}, {"seed": 2, "color_noise": 0.1}, [0, 1]),
             ({"test": True}, {"mode": "test"}, [1000]),
             ({"test": True, "multiview": True}, {"mode": "multiview"}, [1000])]
    for options, expected_kw, numbers in cases:
        p = provider(data, numbers, inner_size=INNER, device=device, **options)
        for batchnum in numbers:
            images, labels, hot = p.get_next_batch().mats
            assert images.device == device and hot.device == device
            expected, expected_labels = reference(data, batchnum, decode=nvjpeg_decode,
                                                  **expected_kw)
            difference = np.abs(images.cpu().numpy() - expected)
            assert difference.mean() < 0.05 and difference.max() < 4.0, expected_kw
            assert labels.cpu().tolist() == expected_labels.tolist()
        p.close()
    images = provider(data, [1000], test=True, inner_size=INNER,
                      device=device).get_next_batch().mats[0].cpu().numpy()
    for shift in (-1, 1):
        shifted, _ = reference(data, 1000, mode="test", shift=shift, decode=nvjpeg_decode)
        assert np.abs(images - shifted).mean() > 0.2
