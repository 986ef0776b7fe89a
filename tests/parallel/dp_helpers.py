"""What the multi-process tests share: the tiny net's command line on the demo digits, the
launchers (our launch/ scripts, the spawner), and checkpoint comparisons."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from distconvnet import checkpoint

REPO = Path(__file__).resolve().parents[2]
# float32 tolerance for weights of O(0.1..1) after ~50 updates summed in another order
WEIGHT_TOLERANCE = 1e-5
# ... and for the per-batch cost sums of the history, relative
HISTORY_TOLERANCE = 1e-6
# CUDA runs compare within this many times the CPU's tolerances: cuDNN and cuBLAS pick their
# kernels, and with them the order of their sums, by batch size, and one process's minibatch is
# not a rank's. (On the CPU, two ranks use a sixth of the tolerances at most.)
CUDA_SLACK = 3
# What a run is told of its device. On CUDA: the float32 reference path (TF32 off), no
# torch.compile and deterministic kernels, so that runs which split the work differently differ
# by float32 rounding alone.
DEVICE_ARGS = {"cpu": ["--device", "cpu"],
               "cuda": ["--device", "cuda", "--precision", "fp32", "--compile", "0",
                        "--deterministic", "1"]}
# NVLink SHARP multicast stays off in every process a test starts: where the fabric cannot do
# it, NCCL hangs at its first collective. The launch scripts and the spawner set these too; the
# tests do not rely on the code under test for the machine's safety.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def build_demo_data(target):
    """data/make_demo_data.py's real digit set: data_batch_1..5 of 300 cases, 6 of 297."""
    spec = importlib.util.spec_from_file_location("make_demo_data",
                                                  REPO / "data" / "make_demo_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.build(Path(target))
    return Path(target)


def tiny_args(data_path, save_path, *extra, device="cpu"):
    """The tiny net on 8x8 crops. --mini 13 cuts a 300-case batch into 23 slices of 13 and one
    of 1, so with two ranks every update has uneven shards (7 + 6) and the last an empty one.
    On CUDA `--gpu 0` unless `extra` lists the GPUs: under a launcher, each rank's own GPU."""
    where = DEVICE_ARGS[device]
    if device == "cuda" and "--gpu" not in extra:
        where = where + ["--gpu", "0"]
    return ["--data-provider", "cifar", "--data-path", str(data_path), "--inner-size", "8",
            "--train-range", "1-2", "--test-range", "6", "--save-path", str(save_path),
            *where, "--layer-def", str(REPO / "layers" / "layers-tiny.cfg"),
            "--layer-params", str(REPO / "layers" / "layer-params-tiny.cfg"),
            "--mini", "13", "--epochs", "1", "--test-freq", "2", "--seed", "7",
            *[str(e) for e in extra]]


def worker_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **NO_MULTICAST_ENV, **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        env.pop(name, None)
    return env


def single(args):
    return [sys.executable, str(REPO / "convnet.py"), *args]


def torchrun(args, nproc=2, *launcher_args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), *launcher_args, str(REPO / "convnet.py"), *args]


def script(name, args):
    return ["bash", str(REPO / "launch" / name), *args]


def run(command, timeout=240, **env):
    """(exit status, stdout, stderr) of a command, in the repository, with a clean launch env."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=worker_env(**env))
    return done.returncode, done.stdout, done.stderr


def run_ok(command, timeout=240, **env):
    status, out, err = run(command, timeout, **env)
    assert status == 0, f"exit {status}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    return out, err


def newest_checkpoint(save_path):
    runs = sorted(Path(save_path).glob("ConvNet__*"))
    assert runs, f"no run directory in {save_path}"
    return checkpoint.load(str(runs[-1]))


def assert_same_weights(a, b, tolerance=WEIGHT_TOLERANCE):
    assert a["weights"].keys() == b["weights"].keys()
    for layer, entry in a["weights"].items():
        other = b["weights"][layer]
        for mine, theirs in zip(entry["weights"] + [entry["biases"]],
                                other["weights"] + [other["biases"]]):
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=tolerance,
                                       err_msg=f"layer {layer}")
    assert (a["epoch"], a["batchnum"]) == (b["epoch"], b["batchnum"])


def assert_same_history(a, b, tolerance=HISTORY_TOLERANCE):
    """Train and test histories: the same cases, the same sums up to float32 rounding."""
    for mine, theirs in ((a["train_outputs"], b["train_outputs"]),
                         (a["test_outputs"], b["test_outputs"])):
        assert [n for _, n in mine] == [n for _, n in theirs]
        for (sums, _), (other, _) in zip(mine, theirs):
            assert sums.keys() == other.keys()
            for name in sums:
                np.testing.assert_allclose(sums[name], other[name], rtol=tolerance)


def check_like_one_process(one_process, out, err, save, device):
    """The weights and history of one process on `device`, up to float32 rounding; rank 0
    printed what one process prints, each line once, and rank 1 printed nothing. Only the
    listings of --dist-backend and --gpu, and the GPUs in use (one per rank), may differ; and
    the listing's padding, as values pad to the longest defaulted one (on CUDA, with --device,
    --precision and --compile typed, typing --dist-backend auto changes it)."""
    base_out, base, _ = one_process
    got = newest_checkpoint(save)
    slack = CUDA_SLACK if device == "cuda" else 1
    assert_same_weights(base, got, WEIGHT_TOLERANCE * slack)
    assert_same_history(base, got, HISTORY_TOLERANCE * slack)
    differing = re.compile(r"^(Collective backend|GPU override|Running on CUDA).*\n", re.M)

    def printed(stdout):
        return re.sub(r" +", " ", differing.sub("", skeleton(stdout)))
    assert printed(out) == printed(base_out)
    if device == "cuda":
        assert re.search(r"^Running on CUDA device\(s\) 0, 1$", out, re.M)
    assert "rank 1" not in err and "Traceback" not in err


def skeleton(stdout):
    """The console text with numbers, times and paths blanked: equal skeletons mean the same
    lines were printed, once each."""
    text = re.sub(r"/\S*ConvNet__\S+", "<run>", stdout)
    text = re.sub(r"Current time: .*", "Current time:", text)
    text = re.sub(r" \[[\d.]+ img/s\]", "", text)
    text = re.sub(r"Save path +: \S+", "Save path:", text)
    return re.sub(r"-?\d+(\.\d+)?(e[-+]\d+)?", "#", text)


def child_pids(pid):
    """The live processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children
