"""ImageDataProvider (CPU DALI) against a float64 numpy/PIL reference of spec §10.3 (its inputs
made elsewhere or broken: test_image_inputs.py).

The data set is made by data/make_batches.py from generated images; the reference recomputes
every draw from the derivation documented in distconvnet/providers/image_plan.py.
"""

import os

import numpy as np
import pytest
import torch
from image_helpers import INNER, image_batches, provider, reference, write_bad_batches

from distconvnet.errors import DataError

pytestmark = pytest.mark.dali


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_batches(tmp_path_factory.mktemp("image"))


@pytest.fixture
def bad_batches(data, tmp_path):
    return write_bad_batches(data, tmp_path)


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


def test_no_room_in_dev_shm_is_one_clear_error(data, monkeypatch):
    from distconvnet.providers import image_reader
    full = os.statvfs_result((4096, 4096, 1000, 10, 10, 100, 0, 0, 0, 255))   # 40 KiB free
    monkeypatch.setattr(image_reader.os, "statvfs", lambda path: full)
    with pytest.raises(DataError, match=r"needs 1 MiB of shared memory in /dev/shm .* 0 MiB "
                                        r"are free: .*--shm-size"):
        provider(data, inner_size=INNER)


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
