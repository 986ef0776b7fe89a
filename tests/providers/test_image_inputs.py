"""ImageDataProvider on inputs made elsewhere or broken: Python 2 pickles, bad JPEGs (named, or
skipped with --skip-bad-images), bad batches.meta and labels; and its shards and contract."""

import io
import struct

import numpy as np
import pytest
import torch
from image_helpers import (INNER, image_batches, provider, reference, smooth_jpeg,
                           write_bad_batches)
from PIL import Image

from distconvnet.errors import DataError, OptionError
from distconvnet.parallel.sharding import shard_indices
from distconvnet.providers.batches import load_meta, read_batch, write_batch, write_meta

pytestmark = pytest.mark.dali


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_batches(tmp_path_factory.mktemp("image"))


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


@pytest.fixture
def bad_batches(data, tmp_path):
    return write_bad_batches(data, tmp_path)


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


def test_an_image_whose_short_side_is_not_the_batches_image_size(data, tmp_path):
    """The original asserted it; make_batches.py writes every image so."""
    write_meta(tmp_path, load_meta(data))
    jpegs = read_batch(data, 0)["data"]
    jpegs[2] = smooth_jpeg(7, 28, 28)          # 28 short side in a batch of 32s
    write_batch(tmp_path, 0, {"data": jpegs, "labels": [[0], [1], [2], [0]]}, sub_batch_size=3)
    with pytest.raises(DataError, match=r"data_batch_0\.0: image 2: 28x28 image, whose short "
                                        r"side is not the batches' image size 32 .*"
                                        r"--skip-bad-images 1"):
        provider(tmp_path, [0], inner_size=INNER).get_next_batch()
    p = provider(tmp_path, [0], inner_size=INNER, skip_bad_images=True, test=True)
    images = p.get_next_batch().mats[0]
    assert torch.equal(images[2], images[3])
    [warning] = p.take_warnings()
    assert "data_batch_0.0: image 2: 28x28 image" in warning and "replaced by image 3" in warning


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
