"""One run of the trainer for bench_scaling.py: what it trains on (a synthetic data set, or
JPEG batches), its command line under each launcher and its environment, its speed from rank
0's metrics log, and the peak GPU memory nvidia-smi sees meanwhile.
"""

import glob
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from .errors import DistconvnetError, OptionError
from .metrics import read_log
from .parallel.launch import NCCL_SAFE_ENV
from .providers.batches import list_batches, read_batch, write_batch, write_meta

REPO = Path(__file__).resolve().parent.parent
LAYERS = REPO / "layers"
CONVNET = REPO / "convnet.py"
MPIRUN_SCRIPT = REPO / "launch" / "mpirun.sh"
# Left over from a launcher that started this benchmark, they would make the runs join its job.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
MEMORY_POLL_S = 0.5
TEST_BATCH = 999      # one minibatch of the 1-GPU run, tested once at the end


class RunFailed(DistconvnetError):
    """One run of the trainer did not finish; the others still run."""


# -- the synthetic data set ------------------------------------------------------------------

def write_synthetic_data(directory, side, classes, settings, growths, seed=0):
    """For each growth g, training batch data_batch_<g> of g x --images cases (batch 1 repeated
    g times), and TEST_BATCH of one minibatch, tested once at the end: uniform random pixels
    and labels in the cifar provider's layout (column-major uint8, batches.meta with a flat
    mean image)."""
    rng = np.random.default_rng(seed)
    num_vis = 3 * side * side
    data = rng.integers(0, 256, (num_vis, settings.images), dtype=np.uint8)
    labels = rng.integers(0, classes, settings.images).tolist()
    for g in sorted(growths):
        write_batch(directory, g, {"data": np.tile(data, (1, g)), "labels": labels * g})
    write_batch(directory, TEST_BATCH, {"data": data[:, :settings.minibatch],
                                        "labels": labels[:settings.minibatch]})
    write_meta(directory, {"data_mean": np.full((num_vis, 1), 127.5, dtype=np.float32),
                           "label_names": [f"class {c}" for c in range(classes)],
                           "img_size": side, "num_vis": num_vis,
                           "num_cases_per_batch": settings.images})


class SyntheticInputs:
    """The batches of write_synthetic_data: a run that grows g times trains on data_batch_<g>."""

    def __init__(self, directory, side):
        self.directory, self.side = directory, side

    def provider_args(self, grown):
        return ["--data-provider", "cifar", "--data-path", str(self.directory), "--inner-size",
                str(self.side), "--train-range", str(grown), "--test-range", str(TEST_BATCH)]

    def images(self, settings, grown):
        return settings.images * grown

    def epochs(self, settings):
        return settings.warmup + settings.batches


class JpegInputs:
    """JPEG batches made by data/make_batches.py, trained through the image provider as the
    seed's ImageNet command does: every run trains on the same data batches (weak scaling grows
    only --mini), each rank decoding its own share of each minibatch on its own GPU."""

    def __init__(self, directory, side):
        numbers = list_batches(directory)
        self.train = [n for n in numbers if n < 1000]
        tests = [n for n in numbers if n >= 1000]
        if not self.train or not tests or self.train != list(range(self.train[0],
                                                                   self.train[-1] + 1)):
            raise OptionError(f"--jpeg-dir {directory}: expected training batches numbered "
                              f"without gaps from make_batches.py and a test batch from 1000")
        self.directory, self.side, self.test = directory, side, tests[0]
        self.per_batch = len(read_batch(directory, self.train[0])["data"])

    def provider_args(self, grown):
        return ["--data-provider", "image", "--data-path", str(self.directory), "--inner-size",
                str(self.side), "--train-range", f"{self.train[0]}-{self.train[-1]}",
                "--test-range", str(self.test), "--color-noise", "0.1"]

    def images(self, settings, grown):
        return self.per_batch

    def epochs(self, settings):
        return math.ceil((settings.warmup + settings.batches) / len(self.train))


# -- one run of the trainer ------------------------------------------------------------------

def trainer_args(net, inputs, save_path, settings, grown, device):
    """The trainer's command line for a run whose --mini (and synthetic data batch) is `grown`
    times the 1-GPU run's."""
    return [*inputs.provider_args(grown),
            "--epochs", str(inputs.epochs(settings)), "--test-freq", "1000000",
            "--layer-def", str(LAYERS / f"layers-{net}.cfg"),
            "--layer-params", str(LAYERS / f"layer-params-{net}.cfg"),
            "--mini", str(settings.minibatch * grown), "--seed", "1", "--device", device,
            "--save-path", str(save_path)]


def launch_command(launcher, count, device, args):
    """(command, extra environment) that starts `count` processes of the trainer."""
    gpus = ["--gpu", ",".join(str(i) for i in range(count))] if device == "cuda" else []
    if count == 1:
        return [sys.executable, str(CONVNET), *args, *gpus], {}
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(count), str(CONVNET), *args, *gpus], {}
    return (["bash", str(MPIRUN_SCRIPT), *args, *gpus],
            {"NGPU": str(count), "PYTHON": sys.executable})


def run_environment(extra, device, threads):
    env = {**os.environ, **NCCL_SAFE_ENV, **extra}
    for name in LAUNCH_VARS:
        env.pop(name, None)
    # mpirun and torchrun of this Python's environment, also when it is not activated
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if device == "cpu":
        # Threads of several processes that outnumber the cores wait on each other's spins.
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_trainer(command, env, timeout):
    """Run one job in its own process group (so that a timeout ends all of its processes);
    returns its stdout, or raises RunFailed with the job's last words."""
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise RunFailed(f"no result within {timeout} s (--timeout)") from None
    if job.returncode != 0:
        sys.stderr.write(f"--- the failed run's last output ({' '.join(command[:6])} ...)\n"
                         f"{(out + err)[-4000:]}\n")
        last = [line for line in (err or out).splitlines() if line.strip()]
        raise RunFailed(f"exit status {job.returncode}: {last[-1] if last else 'no output'}")
    return out


def images_per_second(save_path, settings, images):
    """From rank 0's metrics log: images per batch / median seconds after the warm-up."""
    logs = glob.glob(os.path.join(save_path, "ConvNet__*", "metrics.jsonl"))
    if len(logs) != 1:
        raise RunFailed(f"expected one metrics log under {save_path}, found {len(logs)}")
    trained = [e for e in read_log(logs[0]) if e["event"] == "train"]
    timed = trained[settings.warmup:settings.warmup + settings.batches]
    if len(timed) != settings.batches:
        raise RunFailed(f"{len(timed)} timed batches in {logs[0]}, expected {settings.batches}")
    wrong = [e["cases"] for e in timed if e["cases"] != images]
    if wrong:
        raise RunFailed(f"a batch trained {wrong[0]} images, expected {images}")
    return images / statistics.median(e["seconds"] for e in timed)


class GpuMemoryWatch:
    """The most memory nvidia-smi reports used on one of GPUs 0..count-1 while the watch runs
    (None without nvidia-smi)."""

    def __init__(self, count):
        self.count, self.peak_mib = count, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self):
        while not self._stop.wait(MEMORY_POLL_S):
            used = gpu_memory_used_mib()
            if used:
                most = max(used[:self.count])
                self.peak_mib = most if self.peak_mib is None else max(self.peak_mib, most)


def gpu_memory_used_mib():
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                               "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10)
        return [float(v) for v in done.stdout.split()] if done.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
