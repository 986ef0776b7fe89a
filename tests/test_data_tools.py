"""data/cifar_colmajor.py on a fake official tarball; data/make_demo_data.py end to end."""

import importlib.util
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distconvnet.errors import DataError
from distconvnet.providers import ProviderOptions, make_provider
from distconvnet.providers.batches import load_meta, read_batch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, DATA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cifar_tarball(path, num_cases=4, leave_out=None):
    """The official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, each a
    protocol-2 pickle with (N, 3072) uint8 rows, as cPickle wrote them."""
    rng = np.random.default_rng(0)
    contents = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        contents[name] = {"batch_label": f"{name} of 5",
                          "labels": rng.integers(0, 10, num_cases).tolist(),
                          "data": rng.integers(0, 256, (num_cases, 3072), dtype=np.uint8),
                          "filenames": [f"img_{i}.png" for i in range(num_cases)]}
    contents["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)],
                                "num_cases_per_batch": num_cases, "num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, value in contents.items():
            if name == leave_out:
                continue
            payload = pickle.dumps(value, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return contents


def test_converter_writes_the_colmajor_layout(tmp_path, capsys):
    tool = load_tool("cifar_colmajor")
    source = fake_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "colmajor"
    assert tool.main(["--src", str(tmp_path / "cifar-10-python.tar.gz"), "--tgt", str(out)]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    for number, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3",
                                   "data_batch_4", "data_batch_5", "test_batch"], start=1):
        batch = read_batch(out, number)
        assert batch["data"].shape == (3072, 4) and batch["data"].dtype == np.uint8
        assert np.array_equal(batch["data"], source[name]["data"].T)
        assert batch["labels"] == source[name]["labels"]
    meta = load_meta(out)
    training = np.concatenate([source[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert meta["data_mean"].shape == (3072, 1) and meta["data_mean"].dtype == np.float32
    np.testing.assert_allclose(meta["data_mean"][:, 0], training.astype(np.float64).mean(0),
                               rtol=1e-6)
    assert meta["label_names"] == [f"class{i}" for i in range(10)]
    assert (meta["num_vis"], meta["num_cases_per_batch"], meta["img_size"]) == (3072, 4, 32)
    test = make_provider("cifar", out, [6], test=True,
                         options=ProviderOptions(inner_size=32, scalar_mean=0.0))
    images = test.get_next_batch().mats[0]
    expected = source["test_batch"]["data"].reshape(4, 3, 32, 32) - meta["data_mean"].reshape(
        1, 3, 32, 32)
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-4)


def test_converter_names_a_missing_member(tmp_path):
    tool = load_tool("cifar_colmajor")
    fake_cifar_tarball(tmp_path / "c.tar.gz", leave_out="test_batch")
    with pytest.raises(DataError, match=r"c\.tar\.gz: missing test_batch"):
        tool.convert(tmp_path / "c.tar.gz", tmp_path / "out")


def test_demo_data_are_real_digits_that_the_cifar_provider_loads(tmp_path, capsys):
    tool = load_tool("make_demo_data")
    target = tmp_path / "demo"
    assert tool.main(["--tgt", str(target)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "1797" in line
    first_bytes = (target / "data_batch_1").read_bytes()
    tool.build(target)                                                      # idempotent
    assert (target / "data_batch_1").read_bytes() == first_bytes

    meta = load_meta(target)
    assert meta["label_names"] == [str(d) for d in range(10)]
    assert meta["data_mean"].shape == (3072, 1)
    sizes = [read_batch(target, n)["data"].shape[1] for n in range(1, 7)]
    assert sizes == [300] * 5 + [297]
    digits = read_batch(target, 6)["data"].reshape(3, 32, 32, -1)
    assert np.array_equal(digits[0], digits[1]) and np.array_equal(digits[0], digits[2])
    assert digits.max() > 200 and digits[:, 0, 0].max() < 60      # bright strokes, dark border

    train = make_provider("cifar", target, range(1, 6), options=ProviderOptions(inner_size=24))
    test = make_provider("cifar", target, [6], test=True, options=ProviderOptions(inner_size=24))
    batch = train.get_next_batch()
    assert batch.mats[0].shape == (300, 3, 24, 24)
    labels = torch.cat([train.get_next_batch().mats[1] for _ in range(4)] + [batch.mats[1]])
    assert torch.bincount(labels.long(), minlength=10).min() > 100    # every class in training
    assert test.get_next_batch().mats[1].shape == (297,)


@pytest.mark.parametrize("name", ["make_batches", "make_sample_photos", "make_demo_data"])
def test_help_shows_the_defaults(name, capsys):
    with pytest.raises(SystemExit):
        load_tool(name).main(["--help"])
    out = " ".join(capsys.readouterr().out.split())     # argparse wraps the help text
    expected = {"make_batches": ["images per data batch (default: 3072)",
                                 "seed of the training shuffle (default: 0)"],
                "make_sample_photos": ["(default: 10)", "training photos in all (default: 300)"],
                "make_demo_data": ["output directory (default: "]}[name]
    for text in expected:
        assert text in out
