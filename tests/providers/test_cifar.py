"""CIFARDataProvider against a float64 numpy reference of spec §10.4, on tiny fake batches."""

import pickle

import numpy as np
import pytest
import torch

from distconvnet.errors import DataError, OptionError
from distconvnet.providers import ProviderOptions, make_provider
from distconvnet.providers.cifar import CIFARDataProvider

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]


def noise_images(seed, num_cases):
    return np.random.default_rng(seed).integers(0, 256, (3072, num_cases), dtype=np.uint8)


def write_cifar(path, batches, mean=None, meta_extra=None):
    """Batches as the original tools pickled them: protocol 2, latin-1 str values, numpy data."""
    path.mkdir(exist_ok=True)
    for number, (data, labels) in batches.items():
        batch = {"data": data, "labels": list(labels),
                 "batch_label": f"training batch {number} of 5",
                 "filenames": [f"caf\xe9_{i}.png" for i in range(data.shape[1])]}
        (path / f"data_batch_{number}").write_bytes(pickle.dumps(batch, protocol=2))
    if mean is None:
        mean = np.random.default_rng(99).uniform(0, 255, (3072, 1)).astype(np.float32)
    meta = {"data_mean": mean, "label_names": NAMES, "num_vis": 3072,
            "num_cases_per_batch": 10000, **(meta_extra or {})}
    (path / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return mean


@pytest.fixture
def dataset(tmp_path):
    """Batches 1-3 of 6 noise images; 1 and 2 hold the same pixels (to compare augmentation)."""
    same = noise_images(1, 6)
    batches = {1: (same, [0, 1, 2, 3, 4, 9]), 2: (same, [9, 8, 7, 6, 5, 4]),
               3: (noise_images(3, 6), [5] * 6)}
    mean = write_cifar(tmp_path / "cifar", batches)
    return tmp_path / "cifar", batches, mean


def provider(path, batch_range=(1, 2, 3), **kw):
    option_names = {f.name for f in ProviderOptions.__dataclass_fields__.values()}
    options = ProviderOptions(**{k: v for k, v in kw.items() if k in option_names})
    rest = {k: v for k, v in kw.items() if k not in option_names}
    return CIFARDataProvider(path, list(batch_range), options=options, **rest)


def reference_crop(data, mean, case, y, x, flip, inner, scalar_mean=-1.0):
    image = data[:, case].reshape(3, 32, 32).astype(np.float64) - scalar_mean
    b = (32 - inner) // 2
    crop = image[:, y:y + inner, x:x + inner]
    if flip:
        crop = crop[:, :, ::-1]
    return crop - mean.reshape(3, 32, 32).astype(np.float64)[:, b:b + inner, b:b + inner]


def test_training_crop_flip_and_mean_match_exactly_one_reference_view(dataset):
    path, batches, mean = dataset
    batch = provider(path, inner_size=24).get_next_batch()
    images, labels = batch.mats
    assert images.dtype == torch.float32 and images.shape == (6, 3, 24, 24)
    assert labels.dtype == torch.float32 and labels.tolist() == [0, 1, 2, 3, 4, 9]
    data = batches[1][0]
    for case in range(6):
        out = images[case].numpy()
        matches = [(y, x, flip) for y in range(9) for x in range(9) for flip in (False, True)
                   if np.allclose(out, reference_crop(data, mean, case, y, x, flip, 24),
                                  atol=1e-4, rtol=0)]
        assert len(matches) == 1, (case, matches)


def test_crop_origins_are_uniform_over_the_border_and_half_are_flipped(tmp_path):
    # A position-coded image: R = 8*row, G = 8*column. With a zero mean and scalar mean 0, the
    # first pixel of each crop tells its origin, and G's direction tells the flip.
    rows, cols = np.mgrid[0:32, 0:32]
    image = np.stack([rows * 8, cols * 8, np.zeros_like(rows)]).astype(np.uint8).reshape(3072)
    num_cases = 3000
    data = np.repeat(image[:, None], num_cases, axis=1)
    write_cifar(tmp_path, {1: (data, [0] * num_cases)}, mean=np.zeros((3072, 1), np.float32))
    out = provider(tmp_path, [1], inner_size=24, scalar_mean=0.0).get_next_batch().mats[0]
    origin_y = (out[:, 0, 0, 0] / 8).long()
    flipped = out[:, 1, 0, 0] > out[:, 1, 0, -1]
    origin_x = torch.where(flipped, out[:, 1, 0, -1], out[:, 1, 0, 0]) / 8
    assert torch.equal(out[:, 0, :, 0] / 8 - origin_y[:, None], torch.arange(24.).expand(3000, 24))
    for origin in (origin_y, origin_x.long()):
        counts = torch.bincount(origin, minlength=9)
        assert len(counts) == 9 and counts.min() > num_cases / 9 * 0.7
    assert 0.45 < flipped.float().mean() < 0.55


def test_test_mode_takes_the_centre_crop(dataset):
    path, batches, mean = dataset
    out = provider(path, [3], inner_size=24, test=True).get_next_batch().mats[0].numpy()
    for case in range(6):
        np.testing.assert_allclose(out[case], reference_crop(batches[3][0], mean, case, 4, 4,
                                                             False, 24), atol=1e-4, rtol=0)


def test_multiview_gives_the_nine_grid_views_view_major(dataset):
    path, batches, mean = dataset
    batch = provider(path, [3], inner_size=22, test=True, multiview=True).get_next_batch()
    assert batch.num_views == 9 and batch.mats[0].shape == (54, 3, 22, 22)
    assert batch.mats[1].tolist() == [5.0] * 54
    out = batch.mats[0].numpy()
    for view in range(9):
        y, x = (view // 3) * 5, (view % 3) * 5         # b = (32 - 22) / 2 = 5
        for case in range(6):
            np.testing.assert_allclose(out[6 * view + case],
                                       reference_crop(batches[3][0], mean, case, y, x, False, 22),
                                       atol=1e-4, rtol=0)
    train_only = provider(path, [3], inner_size=22, multiview=True).get_next_batch()
    assert train_only.num_views == 1 and train_only.mats[0].shape[0] == 6


def test_augmentation_is_fixed_by_seed_epoch_and_batchnum(dataset):
    path, _, _ = dataset
    first = provider(path, [1, 2], inner_size=24, seed=5)
    b1, b2, b1_epoch2 = (first.get_next_batch().mats[0] for _ in range(3))
    again = provider(path, [1, 2], inner_size=24, seed=5).get_next_batch().mats[0]
    other_seed = provider(path, [1, 2], inner_size=24, seed=6).get_next_batch().mats[0]
    assert torch.equal(b1, again)
    assert not torch.equal(b1, b2)              # same pixels, other batchnum
    assert not torch.equal(b1, b1_epoch2)
    assert not torch.equal(b1, other_seed)


def test_scalar_mean_is_subtracted_even_at_its_default_of_minus_one(dataset):
    path, batches, mean = dataset

    def centre(**kw):
        return provider(path, [3], inner_size=24, test=True, **kw).get_next_batch().mats[0]
    default, zero, ten = centre(), centre(scalar_mean=0.0), centre(scalar_mean=10.0)
    assert torch.allclose(default - zero, torch.ones(()), atol=1e-4)      # spec §15 item 7
    assert torch.allclose(zero - ten, torch.full((), 10.0), atol=1e-4)
    np.testing.assert_allclose(zero[0].numpy(), reference_crop(batches[3][0], mean, 0, 4, 4,
                                                               False, 24, 0.0), atol=1e-4)


def test_cursor_walks_the_range_then_the_next_epoch(dataset):
    path, _, _ = dataset
    p = provider(path, [1, 2, 3], init_epoch=3, init_batchnum=2, inner_size=24)
    seen = []
    for _ in range(5):
        cursor = p.cursor
        batch = p.get_next_batch()
        assert (batch.epoch, batch.batchnum) == cursor
        seen.append(cursor)
    assert seen == [(3, 2), (3, 3), (4, 1), (4, 2), (4, 3)]
    assert p.cursor == (5, 1)


def test_resume_from_state_dict_continues_identically(dataset):
    path, _, _ = dataset
    original = provider(path, inner_size=24, seed=3)
    for _ in range(2):
        original.get_next_batch()
    state = original.state_dict()
    expected = [original.get_next_batch() for _ in range(4)]
    resumed = provider(path, inner_size=24, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.get_next_batch()
        assert (got.epoch, got.batchnum) == (want.epoch, want.batchnum)
        assert all(torch.equal(a, b) for a, b in zip(got.mats, want.mats))


@pytest.mark.parametrize("mode", [dict(), dict(test=True), dict(test=True, multiview=True)])
def test_each_rank_gets_its_shard_of_the_same_batch(tmp_path, mode):
    write_cifar(tmp_path, {1: (noise_images(7, 10), list(range(10)))})
    common = dict(inner_size=24, seed=1, minibatch=4, **mode)
    whole = provider(tmp_path, [1], **common).get_next_batch()
    views = whole.num_views
    got_cases = []
    for rank in range(3):
        part = provider(tmp_path, [1], rank=rank, world_size=3, **common).get_next_batch()
        cases = part.mats[1][:len(part.mats[1]) // views].long()
        rows = torch.cat([cases + 10 * v for v in range(views)])
        assert torch.equal(part.mats[0], whole.mats[0][rows])
        assert torch.equal(part.mats[1], whole.mats[1][rows])
        got_cases += cases.tolist()
    assert got_cases == [0, 1, 4, 5, 8, 2, 3, 6, 7, 9]


def test_inner_size_zero_is_the_whole_image_with_flips_only(dataset):
    path, batches, mean = dataset
    p = provider(path, [1], inner_size=0)
    assert p.get_data_dims(0) == 3072 and p.get_data_dims(1) == 1
    out = p.get_next_batch().mats[0].numpy()
    for case in range(6):
        assert any(np.allclose(out[case], reference_crop(batches[1][0], mean, case, 0, 0, flip,
                                                         32), atol=1e-4) for flip in (0, 1))
    with pytest.raises(OptionError, match="--inner-size 40"):
        provider(path, [1], inner_size=40)


def test_contract_queries(dataset):
    path, _, _ = dataset
    p = make_provider("cifar", path, [1, 2], options=ProviderOptions(inner_size=24))
    assert isinstance(p, CIFARDataProvider)
    assert p.get_data_dims(0) == 24 * 24 * 3 and p.get_num_classes() == 10
    assert p.label_names == NAMES and p.batch_meta["num_vis"] == 3072
    assert p.num_cases(2) == 6
    with pytest.raises(IndexError):
        p.get_data_dims(2)


def test_batches_are_read_only_when_first_needed(dataset):
    path, _, _ = dataset
    (path / "data_batch_2").write_bytes(b"\x80\x02}(")              # damaged
    p = provider(path, [1, 2], inner_size=24)                        # constructing reads nothing
    p.get_next_batch()
    with pytest.raises(DataError, match="data_batch_2: not a readable pickle"):
        p.get_next_batch()


def test_missing_batch_in_range_fails_at_construction(dataset):
    path, _, _ = dataset
    with pytest.raises(DataError, match=r"data batch 4 not found in .* \(available: 1-3\)"):
        provider(path, [3, 4])


@pytest.mark.parametrize("data,labels,message", [
    (noise_images(0, 4), [0, 1, 2, 10], r"data_batch_1: label 10 is not a class index in 0\.\.9"),
    (noise_images(0, 4), [0, 1, -1, 2], r"data_batch_1: label -1 is not a class index"),
    (noise_images(0, 4), [0, 1, 2], r"data_batch_1: expected 'labels', a list of 4"),
    (noise_images(0, 4).astype(np.float64), [0] * 4,
     r"data_batch_1: expected 'data' to be a uint8 array of shape \(3072, N\), got float64"),
    (noise_images(0, 4).T.copy(), [0] * 4, r"got uint8 array of shape \(4, 3072\)"),
])
def test_bad_batches_are_one_line_errors_naming_the_file(tmp_path, data, labels, message):
    write_cifar(tmp_path, {1: (data, labels)})
    with pytest.raises(DataError, match=message):
        provider(tmp_path, [1]).get_next_batch()


@pytest.mark.parametrize("meta,message", [
    (dict(data_mean=np.zeros((3000, 1), np.float32)),
     r"batches.meta: expected 'data_mean' with 3072 values \(3x32x32 mean image\)"),
    (dict(label_names=[]), r"batches.meta: expected 'label_names'"),
])
def test_bad_meta(tmp_path, meta, message):
    mean = meta.pop("data_mean", None)
    write_cifar(tmp_path, {1: (noise_images(0, 2), [0, 1])}, mean=mean, meta_extra=meta)
    with pytest.raises(DataError, match=message):
        provider(tmp_path, [1])
