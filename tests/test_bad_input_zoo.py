"""The bad-input zoo (issue 8): every bad input below, given to the trainer's command line, ends
with exit status 1 and exactly one line on stderr, `error: ...`, that names the file, line or
layer at fault; no traceback; a checkpoint directory that existed is byte-identical afterwards.
Unusual but valid images (CMYK, grey and progressive JPEGs) train, and --skip-bad-images 1 trains
past bad ones, as documented.

Most cases run the CLI in-process (cli.main, the code path of `python convnet.py`); the cases
marked "real" run `python convnet.py` itself. Bad inputs tested elsewhere and not repeated here:
tests/test_train_errors.py (a batch of the range that does not exist, batches.meta without
data_mean, a missing data directory, a --load-file that does not exist, a damaged checkpoint, an
unknown layer type, bad options, a NaN cost, --inner-size changed on resume) and
tests/providers/test_image.py (bad JPEGs at the provider level).
"""

import io
import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from distconvnet.providers import ProviderOptions, make_provider
from distconvnet.providers.batches import read_batch, write_batch, write_meta
from test_train_errors import assert_one_error_line, snapshot
from trainer_fixtures import (TINY_DEF, TINY_PARAMS, batch_ids, digit_images, run_convnet,
                              run_dir_of, run_in_process, tiny_args, with_dropout)

IMAGE_SIZE, IMAGES_PER_BATCH, SUB_BATCH = 12, 8, 4
# Image batches: 1 and 2 good; 3-5 unusual but valid; 6-10 each with one kind of damage, at
# image 3 of sub-file .1 (case 7 of the batch) where it concerns one image.
GOOD_TRAIN, GOOD_TEST = 1, 2
VALID = {"cmyk": 3, "grey": 4, "progressive": 5}
BAD = {"png": 6, "truncated-jpeg": 7, "truncated-pickle": 8, "label": 9, "empty-dir": 10}


def encode(pixels, mode="RGB", format="JPEG", **options):
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A JPEG data set in the image provider's layout: real digit images, 12x12."""
    root = tmp_path_factory.mktemp("image-zoo")
    images, labels = digit_images(IMAGE_SIZE)
    write_meta(root, {"data_mean": images.reshape(len(images), -1).mean(axis=0).astype(
        np.float32).reshape(-1, 1), "label_names": [str(d) for d in range(10)],
        "num_vis": 3 * IMAGE_SIZE ** 2, "batch_size": IMAGES_PER_BATCH})

    def batch(number, damage=None, **how):
        """Batch `number`: 8 digits encoded as `how` says; `damage` maps the last image and its
        labels to what the batch holds instead."""
        cases = slice(number * IMAGES_PER_BATCH, (number + 1) * IMAGES_PER_BATCH)
        jpegs = [encode(image.transpose(1, 2, 0), **how) for image in images[cases]]
        batch_labels = [[int(label)] for label in labels[cases]]
        if damage:
            jpegs[-1], batch_labels[-1] = damage(jpegs[-1], batch_labels[-1])
        write_batch(root, number, {"data": jpegs, "labels": batch_labels},
                    sub_batch_size=SUB_BATCH)
        return root / f"data_batch_{number}"

    batch(GOOD_TRAIN)
    batch(GOOD_TEST)
    batch(VALID["cmyk"], mode="CMYK")
    batch(VALID["grey"], mode="L")
    batch(VALID["progressive"], progressive=True)
    batch(BAD["png"], lambda jpeg, label: (
        encode(np.asarray(Image.open(io.BytesIO(jpeg))), format="PNG"), label))
    batch(BAD["truncated-jpeg"], lambda jpeg, label: (jpeg[:len(jpeg) // 2], label))
    sub_file = batch(BAD["truncated-pickle"]) / f"data_batch_{BAD['truncated-pickle']}.1"
    sub_file.write_bytes(sub_file.read_bytes()[:100])
    batch(BAD["label"], lambda jpeg, label: (jpeg, [12]))
    (root / f"data_batch_{BAD['empty-dir']}").mkdir()
    return root


def image_args(data, save, train_batches, *extra):
    return ["--data-provider", "image", "--data-path", data, "--train-range", train_batches,
            "--test-range", GOOD_TEST, "--inner-size", 8, "--save-path", save, "--gpu", 0,
            "--layer-def", TINY_DEF, "--layer-params", TINY_PARAMS, "--mini", 4, "--epochs", 1,
            *extra]


class Case(NamedTuple):
    argv: list
    fragments: list          # what the error line must name
    kept: Path = None        # a checkpoint directory that must stay byte-identical


class Zoo:
    """What the cases are made from; each case builds its bad input under tmp_path."""

    def __init__(self, request, tmp_path):
        self.request, self.tmp_path = request, tmp_path

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    def saved_copy(self):
        copy = self.tmp_path / "ConvNet__copy"
        shutil.copytree(self.fixture("tiny_run").run_dir, copy)
        return copy

    def cifar_copy(self):
        copy = self.tmp_path / "data"
        shutil.copytree(self.fixture("digit_cifar"), copy)
        return copy

    def cfg(self, name, text):
        path = self.tmp_path / name
        path.write_text(text)
        return path

    def edited_def(self, old, new):
        text = TINY_DEF.read_text()
        assert old in text
        return self.cfg("layers-bad.cfg", text.replace(old, new))


def line_of(path, line, occurrence=1):
    """The 1-based number of the `occurrence`-th line of file `path` equal to `line`."""
    found = [n for n, text in enumerate(Path(path).read_text().splitlines(), 1) if text == line]
    return found[occurrence - 1]


# -- data ------------------------------------------------------------------------------------

def truncated_cifar_batch(zoo):
    """Resumed onto a data set whose next batch was cut short."""
    data = zoo.cifar_copy()
    batch = data / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    copy = zoo.saved_copy()
    return Case(["--load-file", copy, "--epochs", 3, "--data-path", data],
                [f"{batch}: not a readable pickle", "truncated"], copy)


def cifar_label_out_of_range(zoo):
    data = zoo.cifar_copy()
    with open(data / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    batch["labels"][5] = 12
    with open(data / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    copy = zoo.saved_copy()
    return Case(["--load-file", copy, "--epochs", 3, "--data-path", data],
                [f"{data / 'data_batch_1'}: label 12 is not a class index in 0..9"], copy)


def data_folder_without_batches(zoo):
    data = zoo.tmp_path / "only-meta"
    data.mkdir()
    shutil.copy(zoo.fixture("digit_cifar") / "batches.meta", data)
    return Case(tiny_args(data, zoo.tmp_path / "save"),
                [f"data batch 1 not found in {data}", "(available: none)"])


def data_folder_without_meta(zoo):
    data = zoo.tmp_path / "empty"
    data.mkdir()
    return Case(tiny_args(data, zoo.tmp_path / "save"),
                [f"{data / 'batches.meta'}: batches.meta not found"])


def image_case(batch, fragments):
    def build(zoo):
        data = zoo.fixture("image_data")
        where = data / f"data_batch_{batch}"
        sub_file = where / f"data_batch_{batch}.1"
        return Case(image_args(data, zoo.tmp_path / "save", batch),
                    [f.format(batch=where, sub=sub_file) for f in fragments])
    return build


# -- cfg files -------------------------------------------------------------------------------

def edited_def_case(zoo, old, new, at, *fragments):
    """The tiny net's layer-def with `old` replaced by `new`; the error names the line of `at`."""
    layer_def = zoo.edited_def(old, new)
    return Case(tiny_args(zoo.fixture("digit_cifar"), zoo.tmp_path / "save", layer_def=layer_def),
                [f"{layer_def}:{line_of(layer_def, at)}:", *fragments])


def missing_inputs(zoo):
    return edited_def_case(zoo, "[pool1]\ntype=pool\npool=max\ninputs=conv1\n",
                           "[pool1]\ntype=pool\npool=max\n", "[pool1]", "layer 'pool1'",
                           "missing required key 'inputs'")


def bad_number(zoo):
    return edited_def_case(zoo, "inputs=data\nchannels=3\nfilters=16\n",
                           "inputs=data\nchannels=3\nfilters=1x6\n", "filters=1x6",
                           "layer 'conv1'", "filters='1x6': expected an integer")


def undefined_input_layer(zoo):
    return edited_def_case(zoo, "[fc10]\ntype=fc\ninputs=local2", "[fc10]\ntype=fc\ninputs=local3",
                           "inputs=local3", "layer 'fc10'", "input layer 'local3' does not exist")


def duplicate_section(zoo):
    layer_def = zoo.cfg("layers-bad.cfg", TINY_DEF.read_text() +
                        "\n[fc10]\ntype=fc\ninputs=local2\noutputs=10\n")
    return Case(tiny_args(zoo.fixture("digit_cifar"), zoo.tmp_path / "save", layer_def=layer_def),
                [f"{layer_def}:{line_of(layer_def, '[fc10]', 2)}:",
                 "section [fc10] is defined twice"])


def unparsable_schedule(zoo):
    """Found when a run resumes with an edited layer-params file."""
    params = zoo.cfg("layer-params-bad.cfg", TINY_PARAMS.read_text().replace(
        "[local2]\nepsW=0.01", "[local2]\nepsW=dexp[base=0.01;tgtFactor=x"))
    copy = zoo.saved_copy()
    return Case(["--load-file", copy, "--epochs", 3, "--layer-params", params],
                [f"{params}:{line_of(params, 'epsW=dexp[base=0.01;tgtFactor=x')}:",
                 "layer 'local2'", "cannot parse schedule 'dexp[base=0.01;tgtFactor=x'"], copy)


# -- checkpoints -----------------------------------------------------------------------------

def checkpoint_of_another_net(zoo):
    """The checkpoint's own net is resumed (spec §11.4), so this net's layer-params file, which
    lacks the other net's dropout layer, is what does not fit."""
    layer_def, layer_params = with_dropout(zoo.tmp_path)
    status, stdout, stderr = run_in_process(tiny_args(
        zoo.fixture("digit_cifar"), zoo.tmp_path / "other", "--epochs", 1, "--test-freq", 5,
        layer_def=layer_def, layer_params=layer_params))
    assert status == 0, stderr
    other = Path(run_dir_of(stdout))
    return Case(["--load-file", other, "--layer-def", TINY_DEF, "--layer-params", TINY_PARAMS],
                [str(TINY_PARAMS), "layer 'drop2'", "no [drop2] section"], other)


def a_data_batch_as_checkpoint(zoo):
    batch = zoo.fixture("digit_cifar") / "data_batch_1"
    return Case(["--load-file", batch],
                [f"'{batch}' is damaged or not a distconvnet checkpoint",
                 "it holds a Python object, numpy"])


# name: (builder, how); how names "real" for a run of `python convnet.py` itself, "dali" for a
# case that needs NVIDIA DALI (the image provider).
CASES = {
    "truncated-cifar-batch": (truncated_cifar_batch, ""),
    "cifar-label-out-of-range": (cifar_label_out_of_range, ""),
    "data-folder-without-batches": (data_folder_without_batches, ""),
    "data-folder-without-meta": (data_folder_without_meta, ""),
    "png-in-a-jpeg-batch": (image_case(BAD["png"], [
        "{sub}: image 3: not a JPEG", "--skip-bad-images"]), "dali"),
    "truncated-jpeg": (image_case(BAD["truncated-jpeg"], [
        "{sub}: image 3: truncated JPEG", "--skip-bad-images"]), "real dali"),
    "truncated-sub-batch-pickle": (image_case(BAD["truncated-pickle"], [
        "{sub}: not a readable pickle"]), "dali"),
    "image-label-out-of-range": (image_case(BAD["label"], [
        "{sub}: image 3: label [12] is not a class index in 0..9"]), "dali"),
    "empty-batch-folder": (image_case(BAD["empty-dir"], [
        "{batch}: empty batch directory"]), "dali"),
    "cfg-missing-inputs": (missing_inputs, ""),
    "cfg-bad-number": (bad_number, ""),
    "cfg-undefined-input-layer": (undefined_input_layer, ""),
    "cfg-duplicate-section": (duplicate_section, "real"),
    "params-unparsable-schedule": (unparsable_schedule, ""),
    "checkpoint-of-another-net": (checkpoint_of_another_net, ""),
    "data-batch-as-checkpoint": (a_data_batch_as_checkpoint, "real"),
}


@pytest.mark.parametrize("build, real", [
    pytest.param(build, "real" in how, id=name, marks=[pytest.mark.dali] if "dali" in how else [])
    for name, (build, how) in CASES.items()])
def test_a_bad_input_ends_with_one_line_naming_it(request, tmp_path, build, real):
    case = build(Zoo(request, tmp_path))
    before = snapshot(case.kept) if case.kept else None
    result = run_convnet(case.argv) if real else run_in_process(case.argv)
    assert_one_error_line(*result, *case.fragments)
    if case.kept:
        assert snapshot(case.kept) == before
    else:
        assert not (tmp_path / "save").exists()


# -- handled as documented -------------------------------------------------------------------

@pytest.mark.dali
def test_cmyk_grey_and_progressive_jpegs_decode_as_pil_does_and_train(image_data, tmp_path):
    """Spec §10.2: decoded to RGB (grey expanded), as the original's libjpeg did."""
    for number in VALID.values():
        provider = make_provider("image", image_data, [number], test=True,
                                 options=ProviderOptions(inner_size=IMAGE_SIZE, scalar_mean=0))
        decoded = provider.get_next_batch().mats[0].numpy()
        expected = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)
                    for jpeg in read_batch(image_data, number)["data"]]
        np.testing.assert_array_equal(decoded, np.stack(expected).transpose(0, 3, 1, 2))
    first, last = min(VALID.values()), max(VALID.values())
    status, stdout, stderr = run_in_process(image_args(image_data, tmp_path, f"{first}-{last}"))
    assert status == 0, stderr
    assert batch_ids(stdout) == [f"1.{n}" for n in range(first, last + 1)]


@pytest.mark.dali
def test_skip_bad_images_trains_past_a_png_and_a_truncated_jpeg(image_data, tmp_path):
    status, stdout, stderr = run_in_process(image_args(
        image_data, tmp_path, f"{BAD['png']}-{BAD['truncated-jpeg']}", "--skip-bad-images", 1))
    assert status == 0, stderr
    assert batch_ids(stdout) == [f"1.{BAD['png']}", f"1.{BAD['truncated-jpeg']}"]
    replaced = [line for line in stderr.splitlines() if "replaced by image" in line]
    assert len(replaced) == 2 and all(line.startswith("warning: ") for line in replaced)
    assert "not a JPEG" in replaced[0] and "truncated JPEG" in replaced[1]
