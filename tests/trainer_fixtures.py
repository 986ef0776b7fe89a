"""Helpers for the trainer's end-to-end tests: a small real CIFAR-format data set, command lines,
and ways to run the trainer in-process or as `python convnet.py`.

The data set is written here with plain `pickle` (protocol 2, as the original's cPickle wrote
it), not with distconvnet's writer, so the tests also prove that we read files made elsewhere.
Its images are real: scikit-learn's bundled handwritten digits, enlarged and coloured.
"""

import contextlib
import dataclasses
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from distconvnet import cli

REPO = Path(__file__).resolve().parent.parent
LAYERS = REPO / "layers"
TINY_DEF = LAYERS / "layers-tiny.cfg"
TINY_PARAMS = LAYERS / "layer-params-tiny.cfg"

# spec §9.2, plus our optional throughput after the seconds.
BATCH_LINE = re.compile(r"^\d+\.\d+ \(\d+\.\d\d%\)\.\.\. logprob:  \d+\.\d{6}, \d+\.\d{6}, "
                        r"\d+\.\d{6} \(\d+\.\d{3} sec\)( \[\d+\.\d img/s\])?$")
COSTS_LINE = re.compile(r"^logprob:  \d+\.\d{6}, \d+\.\d{6}, \d+\.\d{6} $")
WEIGHT_LINE = re.compile(r"^Layer '(\w+)' weights\[0\]: (\S+) \[(\S+)\] \[(\S+)\] $")
BIAS_LINE = re.compile(r"^Layer '(\w+)' biases: (\S+) \[(\S+)\] $")
SCI = re.compile(r"^\d\.\d{6}e[+-]\d\d$")


def digit_images(img_size):
    """(N, 3, S, S) uint8 colour images of the 1797 digits, and their labels (N,)."""
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if img_size != 8:
        grey = np.stack([np.asarray(Image.fromarray(g).resize((img_size, img_size),
                                                              Image.BICUBIC)) for g in grey])
    colours = np.stack([grey, grey // 2 + 64, 255 - grey], axis=1)
    return colours, digits.target.astype(int)


def write_digit_cifar(path, num_batches=6, cases=64, img_size=10):
    """data_batch_1..num_batches (the last one is the test batch) and batches.meta, in the
    py-colmajor layout of spec §10.4: 'data' is (3·S², cases) uint8, one image per column."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(img_size)
    columns = images.reshape(len(images), -1).T
    for number in range(1, num_batches + 1):
        cut = slice((number - 1) * cases, number * cases)
        _dump(path / f"data_batch_{number}",
              {"data": np.ascontiguousarray(columns[:, cut]),
               "labels": [int(x) for x in labels[cut]],
               "batch_label": f"digits batch {number}"})
    training = columns[:, :(num_batches - 1) * cases]
    _dump(path / "batches.meta",
          {"data_mean": training.mean(axis=1).astype(np.float32).reshape(-1, 1),
           "label_names": [str(d) for d in range(10)], "num_vis": columns.shape[0],
           "num_cases_per_batch": cases, "img_size": img_size})
    return path


def _dump(path, value):
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=2)


def tiny_args(data_path, save_path, *extra, layer_def=TINY_DEF, layer_params=TINY_PARAMS):
    """The tiny net on the 10x10 digit set (crops of 8, as layers-tiny.cfg reads 3x8x8)."""
    return ["--data-provider", "cifar", "--test-range", "6", "--train-range", "1-5",
            "--data-path", str(data_path), "--inner-size", "8", "--save-path", str(save_path),
            "--gpu", "0", "--layer-def", str(layer_def), "--layer-params", str(layer_params),
            "--mini", "16", *[str(e) for e in extra]]


def run_in_process(argv):
    """(exit status, stdout, stderr) of `python convnet.py argv`, run in this process with one
    compute thread, like the subprocesses (see subprocess_env)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["train", *[str(a) for a in argv]])
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


def convnet_command(argv):
    return [sys.executable, str(REPO / "convnet.py"), *[str(a) for a in argv]]


def run_convnet(argv, timeout=120):
    """`python convnet.py argv` as a real process: (exit status, stdout, stderr)."""
    done = subprocess.run(convnet_command(argv), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())
    return done.returncode, done.stdout, done.stderr


def subprocess_env():
    """Unbuffered, so a parent reading the child's output sees each line as it is printed; one
    compute thread, as run_in_process uses: the tiny nets gain nothing from more on a shared
    2-core machine (busy cores make OpenMP threads spin), and equal thread counts keep results
    computed here and in-process equal to the bit."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_dir_of(stdout):
    """The checkpoint directory a run announced."""
    found = re.findall(r"^Saved checkpoint to (.+)$", stdout, re.M)
    assert found, "the run saved no checkpoint:\n" + stdout
    return found[-1]


def batch_ids(stdout):
    """['1.1', '1.2', ...]: the epoch.batch of every training batch line, in order."""
    return re.findall(r"^(\d+\.\d+) \(\d+\.\d\d%\)\.\.\. ", stdout, re.M)


def event_costs(stdout):
    """[(logprob, top-1 error, top-k error), ...] of every Test output block, in order."""
    found = re.findall(r"^=+Test output=+\nlogprob:  (\S+), (\S+), (\S+) $", stdout, re.M)
    return [tuple(float(v.rstrip(",")) for v in costs) for costs in found]


def with_dropout(tmp_path):
    """layers-tiny.cfg with a dropout layer before fc10 (so runs also draw dropout masks)."""
    text = TINY_DEF.read_text().replace(
        "[fc10]\ntype=fc\ninputs=local2",
        "[drop2]\ntype=dropout\ninputs=local2\n\n[fc10]\ntype=fc\ninputs=drop2")
    assert "[drop2]" in text
    layer_def = Path(tmp_path) / "layers-tiny-dropout.cfg"
    layer_def.write_text(text)
    layer_params = Path(tmp_path) / "layer-params-tiny-dropout.cfg"
    layer_params.write_text(TINY_PARAMS.read_text() + "\n[drop2]\nenable=1\nkeep=0.8\n")
    return layer_def, layer_params


@dataclasses.dataclass
class TinyRun:
    """A finished run of the tiny net: 2 epochs over batches 1-4, tests of batches 5-6 (one per
    event, --test-one's default) every 3 batches, and at the end."""

    argv: list
    status: int
    stdout: str
    stderr: str

    TRAIN_RANGE, TEST_RANGE, EPOCHS, TEST_FREQ = [1, 2, 3, 4], [5, 6], 2, 3

    @classmethod
    def train(cls, data_path, save_path):
        argv = tiny_args(data_path, save_path, "--train-range", "1-4", "--test-range", "5-6",
                         "--epochs", cls.EPOCHS, "--test-freq", cls.TEST_FREQ, "--seed", 5)
        run = cls(argv, *run_in_process(argv))
        assert run.status == 0, run.stderr
        return run

    @property
    def run_dir(self):
        return run_dir_of(self.stdout)
