"""The process-wide settings that shape a run's numbers and speed, set in one place, each with
its reason:

    before_cuda()  at process start (cli.main, bench.main), before anything starts CUDA
    for_run(...)   once per run, after the device is chosen and before anything is built

(The few other process-wide settings stay where they serve, with their reasons: the NCCL
switches of a job in parallel/launch.py, DDP's warnings in parallel/data_parallel.py, dynamo's
room for compiled segments in parallel/model_parallel.py.)
"""

import os

import torch

HARDWARE_QUEUES = 32   # CUDA's maximum; its default is 8


def before_cuda():
    """Let CUDA map streams onto as many hardware work queues as it can (unless the user chose
    a number). DALI decodes on some thirty streams beside the trainer's; where two streams
    share a queue, a kernel of one waits for the kernel queued ahead of it by the other, and
    the decoder's chains of small kernels then advance one kernel per training kernel. CUDA
    reads the setting when it starts, hence before anything starts it."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", str(HARDWARE_QUEUES))


def for_run(device, precision, deterministic):
    """The settings of a run on `device` at `precision` ("fp32" or "bf16"):

    * --deterministic 1: the same run gives the same bits (use_deterministic_algorithms);
    * cuDNN times its kernels and keeps the fastest (benchmark), unless determinism is asked
      for: the timing may pick different kernels run to run;
    * fp32 is the float32 reference path: TF32 off (float32_exactly);
    * the trainer's thread queues its work on a CUDA stream of its own (use_own_stream)."""
    if deterministic:
        use_deterministic_algorithms()
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    if precision == "fp32":
        float32_exactly(device)
    use_own_stream(device)


def float32_exactly(device):
    """Float32 matmuls and convolutions without TF32 (10-bit mantissas), which cuDNN would
    otherwise use: the reference path of --precision fp32, and the benchmark's fp32 peers."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def use_deterministic_algorithms():
    """--deterministic 1. cuBLAS reads its workspace setting when it first starts, so this
    comes before any CUDA work."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def use_own_stream(device):
    """On CUDA, the calling thread (the trainer's) queues its work on a stream of its own, not
    on the legacy default stream, with which every blocking stream synchronises, so that no
    other library's stream waits behind a queued step. (On an H200 with DALI's decoder beside
    the step it changed the JPEG-to-update rate within noise: BENCHMARKS.md, 2026-12-04.) A
    thread already on a stream of its own keeps it."""
    if device.type == "cuda" and torch.cuda.current_stream(device) == \
            torch.cuda.default_stream(device):
        torch.cuda.set_stream(torch.cuda.Stream(device))
