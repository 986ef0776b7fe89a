"""Every registered provider through the one contract the run relies on (batches.Provider):
the cursor walks the range in ccn2's order, state_dict/load_state_dict resume the same batch,
num_cases counts the whole batch, a rank keeps its shard of it, warnings and close work."""

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distconvnet.parallel.sharding import shard_indices
from distconvnet.providers import PROVIDERS, ProviderOptions, make_provider
from distconvnet.providers.batches import Provider

MAKE_BATCHES = Path(__file__).resolve().parents[2] / "data" / "make_batches.py"


def jpeg(seed, size):
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def image_batches(tmp_path_factory):
    """data_batch_0 and _1 of 5 images each, made by data/make_batches.py."""
    root = tmp_path_factory.mktemp("protocol-images")
    for k in range(10):
        path = root / "src" / "train" / f"class{k % 2}" / f"img{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(k, 36))
    spec = importlib.util.spec_from_file_location("make_batches", MAKE_BATCHES)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["make_batches"] = tool
    spec.loader.exec_module(tool)
    assert tool.main(["--src-dir", str(root / "src"), "--tgt-dir", str(root / "out"),
                      "--batch-size", "5", "--image-size", "32", "--jobs", "1"]) == 0
    return root / "out"


# name: (the data path fixture, batch range, --inner-size); dummy-* take their dims from the name
SOURCES = {
    "cifar": ("digit_cifar", [1, 2, 3], 8),
    "image": ("image_batches", [0, 1], 24),
    "dummy-lr-n": (None, [1, 2, 3], 0),
    "dummy-labeled-n": (None, [1, 2], 0),
}
MARKS = {"image": [pytest.mark.dali]}


def build(request, name, rank=0, world_size=1, **cursor):
    fixture, batch_range, inner = SOURCES[name]
    path = request.getfixturevalue(fixture) if fixture else ""
    registered = name.replace("-n", "-12") if name.startswith("dummy-") else name
    options = ProviderOptions(inner_size=inner, seed=3, minibatch=4)
    return make_provider(registered, path, batch_range, options=options, rank=rank,
                         world_size=world_size, **cursor)


def test_the_sweep_covers_every_registered_provider():
    assert sorted(SOURCES) == sorted(PROVIDERS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, [])) for n in SOURCES])
def test_every_provider_keeps_the_contract(request, name):
    batch_range = SOURCES[name][1]
    provider = build(request, name)
    assert isinstance(provider, Provider)
    assert isinstance(provider.batch_meta, dict)
    assert provider.get_num_classes() > 0 and provider.get_data_dims(0) > 0
    walked = []
    for _ in range(len(batch_range) + 1):
        cursor = provider.cursor
        batch = provider.get_next_batch()
        assert (batch.epoch, batch.batchnum) == cursor
        assert batch.mats[0].shape[0] == provider.num_cases(batch.batchnum)
        assert batch.mats[0][0].numel() == provider.get_data_dims(0)
        walked.append(cursor)
    assert walked == [(1, n) for n in batch_range] + [(2, batch_range[0])]
    assert provider.take_warnings() == []

    state = provider.state_dict()
    expected = provider.get_next_batch()
    resumed = build(request, name)
    resumed.load_state_dict(state)
    assert resumed.cursor == (expected.epoch, expected.batchnum)
    again = resumed.get_next_batch()
    for a, b in zip(expected.mats, again.mats):
        assert torch.equal(a, b)
    for p in (provider, resumed):
        p.close()


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, [])) for n in SOURCES])
def test_every_provider_keeps_its_ranks_shard(request, name):
    """Two ranks: each keeps the rows sharding.shard_indices gives it, and counts the whole."""
    whole = build(request, name).get_next_batch()
    for rank in range(2):
        provider = build(request, name, rank=rank, world_size=2)
        batch = provider.get_next_batch()
        rows = torch.from_numpy(shard_indices(whole.mats[0].shape[0], 4, rank, 2))
        assert provider.num_cases(batch.batchnum) == whole.mats[0].shape[0]
        assert torch.equal(batch.mats[1], whole.mats[1][rows.to(whole.mats[1].device)])
        provider.close()
