"""Dummy providers (spec §3.5, §10.5) and the provider registry's name resolution."""

import pytest
import torch

from distconvnet.errors import DataError
from distconvnet.providers import PROVIDERS, ProviderOptions, _Registry, make_provider
from distconvnet.providers.dummy import (DummyConvNetLogRegDataProvider,
                                         LabeledDummyDataProvider)


def test_image_shaped_dimensionality_gives_nchw_images():
    p = make_provider("dummy-lr-48", None, None)
    assert isinstance(p, DummyConvNetLogRegDataProvider)
    batch = p.get_next_batch()
    images, labels = batch.mats
    assert images.shape == (7, 3, 4, 4) and images.dtype == torch.float32
    assert labels.shape == (7,) and labels.dtype == torch.float32
    assert ((images >= 0) & (images < 1)).all()
    assert set(labels.tolist()) <= set(range(10))
    assert batch.num_views == 1
    assert p.get_data_dims(0) == 48 and p.get_data_dims(1) == 1 and p.get_num_classes() == 10


def test_other_dimensionality_stays_flat():
    p = make_provider("dummy-labeled-10", None, None)
    assert isinstance(p, LabeledDummyDataProvider)
    assert p.get_next_batch().mats[0].shape == (7, 10)
    assert p.label_names == [str(i) for i in range(10)] and p.batch_meta["num_vis"] == 10


def test_the_same_data_every_batch_and_seeded():
    p = make_provider("dummy-lr-12", None, [1, 2])
    batches = [p.get_next_batch() for _ in range(3)]
    assert [(b.epoch, b.batchnum) for b in batches] == [(1, 1), (1, 2), (2, 1)]
    assert all(torch.equal(b.mats[0], batches[0].mats[0]) for b in batches)
    again = make_provider("dummy-lr-12", None, None).get_next_batch()
    other = make_provider("dummy-lr-12", None, None,
                          options=ProviderOptions(seed=1)).get_next_batch()
    assert torch.equal(again.mats[0], batches[0].mats[0])
    assert not torch.equal(other.mats[0], again.mats[0])


def test_default_range_is_batch_one_and_state_round_trips():
    p = make_provider("dummy-lr-3", None, None, init_epoch=4)
    assert p.cursor == (4, 1)
    p.get_next_batch()
    assert p.cursor == (5, 1) and p.num_cases(1) == 7
    q = make_provider("dummy-lr-3", None, None)
    q.load_state_dict(p.state_dict())
    assert q.cursor == (5, 1)


def test_ranks_share_out_the_seven_cases():
    full = make_provider("dummy-lr-4", None, None).get_next_batch().mats[0]
    parts = [make_provider("dummy-lr-4", None, None, rank=r, world_size=2).get_next_batch()
             for r in range(2)]
    assert [len(p.mats[0]) for p in parts] == [4, 3]
    assert torch.equal(torch.cat([p.mats[0] for p in parts]), full)


@pytest.mark.parametrize("name", ["nosuch", "dummy-lr-0", "dummy-lr-x", "dummy-foo-5",
                                  "dummy-lr-n", "cifar-5"])
def test_unknown_names_list_what_is_available(name):
    with pytest.raises(DataError, match=f"^Unable to create data provider: No such data "
                                        f"provider: {name} \\(available: cifar, "
                                        f"dummy-labeled-n, dummy-lr-n, image\\)$"):
        make_provider(name, None, None)


def test_lazy_entries_are_imported_only_when_looked_up():
    registry = _Registry({"eager": LabeledDummyDataProvider, "lazy": ".not_written_yet:Cls"})
    assert "lazy" in registry and sorted(registry) == ["eager", "lazy"] and len(registry) == 2
    assert registry["eager"] is LabeledDummyDataProvider
    with pytest.raises(ModuleNotFoundError, match="distconvnet.providers.not_written_yet"):
        registry["lazy"]
    assert "image" in PROVIDERS
