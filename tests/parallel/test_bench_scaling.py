"""The scaling benchmark's smoke run: the real trainer, 1 and 2 CPU processes with gloo, the tiny
net on synthetic batches, one line per net with positive speeds."""

import re
import sys

import pytest

from dp_helpers import run, run_ok

pytestmark = pytest.mark.slow

BENCH = [sys.executable, "-m", "distconvnet.bench_scaling"]
SPEED = r"(\d+\.\d) img/s"


def test_quick_cpu_run_prints_one_line_per_net():
    out, err = run_ok([*BENCH, "--device", "cpu", "--quick"])
    lines = out.splitlines()
    assert re.match(r"distconvnet\.bench_scaling \d{4}-\d\d-\d\d \d\d:\d\d \| device: CPU, "
                    r"\d+ cores .*\| torch \S+ \| 2 processes at most, launcher torchrun",
                    lines[0])
    assert lines[1].startswith("input: synthetic, 256 images per data batch (3x8x8, 10 classes)")
    found = re.fullmatch(rf"tiny \(torchrun\): 1 process {SPEED}, 2 processes {SPEED} "
                         rf"\(speedup (\d+\.\d\d), efficiency (\d+\.\d)%\)", lines[2])
    assert found, out
    one, two, speedup, efficiency = (float(v) for v in found.groups())
    assert one > 0 and two > 0
    assert speedup == pytest.approx(two / one, abs=0.01)
    assert efficiency == pytest.approx(100 * speedup / 2, abs=0.5)
    assert len(lines) == 3 and "Traceback" not in err


def test_an_unknown_net_is_one_line_and_exit_status_1():
    status, out, err = run([*BENCH, "--device", "cpu", "--nets", "tiny,nosuchnet"], timeout=60)
    assert status == 1 and out == ""
    assert err.startswith("error: --nets: 'nosuchnet' is not a net of ")
    assert len(err.splitlines()) == 1
