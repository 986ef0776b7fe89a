"""data/make_batches.py on tiny generated image sets: a class-folder tree and fake ILSVRC tars."""

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distconvnet.providers.batches import list_batches, load_meta, read_batch

TOOL_PATH = Path(__file__).resolve().parent.parent / "data" / "make_batches.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_batches", TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_batches"] = module      # so the pool can pickle its worker by name
    spec.loader.exec_module(module)
    return module


def smooth_image(seed, width, height):
    """A smooth random RGB pattern (an upscaled 4x4 noise image), so JPEG error stays small."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(image, **kw):
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, **kw)
    return out.getvalue()


def make_tree(root):
    """train/{cat,dog}, val/{cat,dog} with every awkward kind of file the tool must handle.
    Returns {relative name: source bytes} of the readable images."""
    files = {
        "train/cat/a.jpg": jpeg_bytes(smooth_image(1, 48, 32)),
        "train/cat/b.jpg": jpeg_bytes(smooth_image(2, 20, 40)),                 # enlarged
        "train/cat/c.jpg": jpeg_bytes(smooth_image(3, 32, 32).convert("CMYK")),
        "train/dog/d.jpg": jpeg_bytes(smooth_image(4, 40, 40).convert("L")),
        "train/dog/e.jpg": jpeg_bytes(smooth_image(5, 64, 40), progressive=True),
        "train/dog/f.jpeg": jpeg_bytes(smooth_image(6, 36, 50)),
        "val/dog/v2.jpg": jpeg_bytes(smooth_image(8, 40, 32)),
        "val/cat/v1.jpg": jpeg_bytes(smooth_image(7, 32, 40)),
        "val/cat/v3.jpg": jpeg_bytes(smooth_image(9, 33, 33)),
    }
    png = io.BytesIO()
    smooth_image(10, 40, 36).save(png, "PNG")
    files["train/dog/png_named.jpg"] = png.getvalue()
    palette = io.BytesIO()
    paletted = smooth_image(11, 32, 32).quantize(256, dither=Image.Dither.NONE)
    paletted.save(palette, "PNG", transparency=0)
    files["train/cat/palette.png"] = palette.getvalue()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train/dog/truncated.jpg").write_bytes(files["train/dog/f.jpeg"][:300])
    return files


def run_tool(tool, src, tgt, *extra):
    return tool.main(["--src-dir", str(src), "--tgt-dir", str(tgt), "--batch-size", "4",
                      "--sub-batch-size", "3", "--image-size", "32", "--jobs", "2", *extra])


def decoded(jpeg):
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert not image.info.get("progressive") and not image.info.get("progression")
        return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def tree_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    files = make_tree(root / "src")
    return load_tool(), root, files


def test_folder_tree_batches_meta_and_console(tree_output, capfd):
    tool, root, files = tree_output
    assert run_tool(tool, root / "src", root / "out", "--seed", "3") == 0
    out, err = capfd.readouterr()
    assert "truncated.jpg" in err and err.count("\n") == 1
    lines = out.splitlines()
    assert lines[:3] == ["CROP_TO_SQUARE: True", "OUTPUT_IMAGE_SIZE: 32", "NUM_WORKER_THREADS: 2"]
    assert f"Wrote {root / 'out' / 'data_batch_0'} (training batch 1 of 3)" in out
    assert f"Wrote {root / 'out' / 'data_batch_1000'} (validation batch 1 of 1)" in out
    assert ("8 training images in batches 0-1, 3 validation images in batches 1000-1000; "
            "1 unreadable image skipped") in out
    assert lines[-1] == f"All done! Batches are in {root / 'out'}"

    assert list_batches(root / "out") == [0, 1, 1000]
    assert sorted(p.name for p in (root / "out" / "data_batch_0").iterdir()) == [
        "data_batch_0.0", "data_batch_0.1"]
    train = [read_batch(root / "out", n) for n in (0, 1)]
    assert [len(b["data"]) for b in train] == [4, 4]
    labels = [label for b in train for label in b["labels"]]
    assert sorted(labels) == [[0]] * 4 + [[1]] * 4
    val = read_batch(root / "out", 1000)
    assert val["labels"] == [[0], [1], [0]]                  # v1 (cat), v2 (dog), v3 (cat)

    meta = load_meta(root / "out")
    assert meta["label_names"] == ["cat", "dog"]
    assert (meta["batch_size"], meta["num_vis"]) == (4, 32 * 32 * 3)
    pixels = np.stack([tool.resize_to_square(files[name], 32)[1] for name in files
                       if name.startswith("train/")]).astype(np.float64)
    mean = meta["data_mean"]
    assert mean.dtype == np.float32 and mean.shape == (3072, 1)
    np.testing.assert_allclose(mean[:, 0], pixels.mean(0).transpose(2, 0, 1).reshape(-1),
                               rtol=1e-6)
    stdevs, eigvecs = meta["color_pca"]
    assert stdevs.shape == (3,) and eigvecs.shape == (3, 3) and np.all(np.diff(stdevs) >= 0)
    covariance = np.cov(pixels.reshape(-1, 3), rowvar=False, bias=True)
    np.testing.assert_allclose(eigvecs @ np.diag(stdevs ** 2) @ eigvecs.T, covariance,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-10)


def test_every_stored_image_is_the_clean_centre_square(tree_output):
    tool, root, files = tree_output
    stored = [jpeg for n in (0, 1, 1000) for jpeg in read_batch(root / "out", n)["data"]]
    references = [tool.resize_to_square(data, 32)[1] for data in files.values()]
    for jpeg in stored:
        image = decoded(jpeg)
        assert image.shape == (32, 32, 3)
        errors = sorted(np.abs(image - ref).mean() for ref in references)
        assert errors[0] < 8.0 and errors[1] > 30.0    # q95 JPEG of exactly one source image
    first = files["train/cat/a.jpg"]
    with Image.open(io.BytesIO(first)) as source:        # 48x32: short side already 32
        expected = np.asarray(source.convert("RGB"), np.float64)[:, 8:40]
    assert np.abs(tool.resize_to_square(first, 32)[1] - expected).max() == 0


def test_same_seed_same_bytes_other_seed_other_order(tree_output):
    tool, root, _ = tree_output
    assert run_tool(tool, root / "src", root / "again", "--seed", "3") == 0
    assert run_tool(tool, root / "src", root / "other", "--seed", "4") == 0
    again = [read_batch(root / "again", n)["data"] for n in (0, 1)]
    first = [read_batch(root / "out", n)["data"] for n in (0, 1)]
    other = [read_batch(root / "other", n)["data"] for n in (0, 1)]
    assert again == first
    assert other != first and sorted(sum(other, [])) == sorted(sum(first, []))


def test_missing_source_is_one_clear_error(tmp_path, capfd):
    tool = load_tool()
    assert run_tool(tool, tmp_path, tmp_path / "out") == 1
    assert "found neither ILSVRC2012_img_train.tar" in capfd.readouterr().err


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_ilsvrc(src):
    """The three ILSVRC-2012 files in miniature: 2 leaf synsets (+1 non-leaf), nested tars."""
    scipy_io = pytest.importorskip("scipy.io")
    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    synsets[0] = (2, "n02", "dog, domestic dog")
    synsets[1] = (1, "n01", "tench, Tinca tinca")
    synsets[2] = (1001, "n99", "animal")
    mat = io.BytesIO()
    scipy_io.savemat(mat, {"synsets": synsets})
    with tarfile.open(src / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add_member(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_member(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                   b"2\n1\n2\n")
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, seeds in (("n01", (1, 2, 3)), ("n02", (4, 5))):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for seed in seeds:
                    add_member(tar, f"{wnid}_{seed}.JPEG", jpeg_bytes(smooth_image(seed, 40, 36)))
            add_member(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as tar:
        for index in (3, 1, 2):                                     # stored out of order
            add_member(tar, f"ILSVRC2012_val_{index:08d}.JPEG",
                       jpeg_bytes(smooth_image(100 + index, 36, 40)))


def test_ilsvrc_tars(tmp_path, capfd):
    tool = load_tool()
    src = tmp_path / "src"
    src.mkdir()
    make_ilsvrc(src)
    assert run_tool(tool, src, tmp_path / "out") == 0
    out = capfd.readouterr().out
    assert "Loaded synset tars." in out and "0% ..." in out
    assert out.splitlines()[-1] == f"All done! ILSVRC 2012 batches are in {tmp_path / 'out'}"
    meta = load_meta(tmp_path / "out")
    assert meta["label_names"] == ["tench, Tinca tinca", "dog, domestic dog"]
    train = [read_batch(tmp_path / "out", n) for n in (0, 1)]
    labels = sorted(label for b in train for [label] in b["labels"])
    assert labels == [0, 0, 0, 1, 1]
    val = read_batch(tmp_path / "out", 1000)
    assert val["labels"] == [[1], [0], [1]]
    expected = tool.resize_to_square(jpeg_bytes(smooth_image(101, 36, 40)), 32)[1]
    assert np.abs(decoded(val["data"][0]) - expected).mean() < 4.0
