"""The scaling benchmark's smoke run: the real trainer, 1 and 2 CPU processes with gloo, the tiny
net on synthetic batches, one line per net and way of scaling with positive speeds."""

import re
import sys

import pytest

from dp_helpers import run, run_ok

pytestmark = pytest.mark.slow

BENCH = [sys.executable, "-m", "distconvnet.bench_scaling"]
SPEED = r"(\d+\.\d) img/s"


def test_quick_cpu_run_prints_strong_and_weak_scaling_per_net():
    out, err = run_ok([*BENCH, "--device", "cpu", "--quick"])
    lines = out.splitlines()
    assert re.match(r"distconvnet\.bench_scaling \d{4}-\d\d-\d\d \d\d:\d\d \| device: CPU, "
                    r"\d+ cores .*\| torch \S+ \| 2 processes at most, launcher torchrun",
                    lines[0])
    assert lines[1].startswith("input: synthetic, 256 images per data batch (3x8x8, 10 classes) "
                               "and --mini 64 on 1 process; strong scaling: the same at every "
                               "count; weak scaling: both times the count;")
    speeds = {}
    for line, scaling in zip(lines[2:], ("strong", "weak")):
        found = re.fullmatch(rf"tiny \(torchrun\), {scaling} scaling: 1 process {SPEED}, "
                             rf"2 processes {SPEED} \(speedup (\d+\.\d\d), efficiency "
                             rf"(\d+\.\d)%\)", line)
        assert found, out
        one, two, speedup, efficiency = (float(v) for v in found.groups())
        assert one > 0 and two > 0
        assert speedup == pytest.approx(two / one, abs=0.01)
        assert efficiency == pytest.approx(100 * two / (2 * one), abs=0.1)
        speeds[scaling] = one, two
    assert speeds["strong"][0] == speeds["weak"][0]          # one 1-process run serves both
    assert len(lines) == 4 and "Traceback" not in err


def test_an_unknown_net_is_one_line_and_exit_status_1():
    status, out, err = run([*BENCH, "--device", "cpu", "--nets", "tiny,nosuchnet"], timeout=60)
    assert status == 1 and out == ""
    assert err.startswith("error: --nets: 'nosuchnet' is not a net of ")
    assert len(err.splitlines()) == 1


def test_an_unknown_scaling_is_one_line_and_exit_status_1():
    status, out, err = run([*BENCH, "--device", "cpu", "--scaling", "strong,linear"], timeout=60)
    assert status == 1 and out == ""
    assert err == "error: --scaling strong,linear: expected a comma list of strong and weak\n"


@pytest.fixture(scope="module")
def jpeg_batches(tmp_path_factory):
    """Two training batches of 20 photographs (32 px, 10 classes) and a test batch, made by the
    data tools."""
    root = tmp_path_factory.mktemp("jpegs")
    run_ok([sys.executable, "data/make_sample_photos.py", "--tgt", str(root / "photos"),
            "--train", "40", "--val", "10", "--classes", "10", "--size", "40"])
    run_ok([sys.executable, "data/make_batches.py", "--src-dir", str(root / "photos"),
            "--tgt-dir", str(root / "batches"), "--batch-size", "20", "--image-size", "32",
            "--jobs", "2"])
    return root / "batches"


@pytest.mark.dali
def test_jpeg_batches_train_through_the_image_provider_on_each_rank(jpeg_batches):
    out, err = run_ok([*BENCH, "--device", "cpu", "--quick", "--nets", "tiny", "--scaling",
                       "strong", "--data", "image", "--jpeg-dir", str(jpeg_batches)])
    lines = out.splitlines()
    assert lines[1].startswith(f"input: JPEG batches {jpeg_batches} (2 of 20 images; each rank "
                               f"decodes its share; 8x8 crops, colour noise 0.1) and --mini 64 "
                               f"on 1 process; strong scaling: the same at every count;")
    assert re.fullmatch(rf"tiny \(torchrun\), strong scaling: 1 process {SPEED}, 2 processes "
                        rf"{SPEED} \(speedup \d+\.\d\d, efficiency \d+\.\d%\)", lines[2]), out
    assert len(lines) == 3 and "Traceback" not in err


def test_image_data_without_a_jpeg_dir_is_one_line():
    status, out, err = run([*BENCH, "--device", "cpu", "--quick", "--data", "image"],
                           timeout=60)
    assert (status, out) == (1, "")
    assert err == "error: --data image needs --jpeg-dir DIR (batches of data/make_batches.py)\n"
