"""Command-line entry: argv -> subcommand. The one place that turns errors into one line + exit.

    python convnet.py ...                 (the original's command line; same as `train`)
    python -m distconvnet [train] ...
    python -m distconvnet summary --layer-def F --layer-params P --inner-size N
    python -m distconvnet show --load-file DIR ...   (python shownet.py ...: plots as PNG files)
    python -m distconvnet bench ... | bench_scaling ...
    python -m distconvnet torchrun [torchrun's arguments] convnet.py ...   (launch/torchrun.sh)
"""

import sys

from . import knobs
from .errors import DistconvnetError

HELP_FLAGS = ("-h", "--help")


def main(argv=None):
    knobs.before_cuda()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    debug = _wants_debug(argv)
    try:
        return COMMANDS[command](argv) or 0
    except DistconvnetError as e:
        if debug:
            raise
        sys.stdout.flush()
        rank, world_size = _place_in_job()
        print(f"{f'rank {rank}: ' if world_size > 1 else ''}error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stdout.flush()
        if _place_in_job()[0] == 0:     # every rank got the Ctrl-C; one says so
            print("\nInterrupted; checkpoints already written are intact.", file=sys.stderr)
        return 130


def _place_in_job():
    """(rank, world size), so that an error line in a job of several ranks says whose it is."""
    from .parallel.launch import rank_and_world_size
    return rank_and_world_size()


def _wants_debug(argv):
    for i, arg in enumerate(argv):
        if arg == "--debug":
            return i + 1 >= len(argv) or argv[i + 1] != "0"
        if arg.startswith("--debug="):
            return arg.split("=", 1)[1] != "0"
    return False


def train_command(argv):
    from . import options, report
    # The original printed its usage table for no arguments; -h and --help do too here, and
    # then name the other commands.
    if not argv or any(arg in HELP_FLAGS for arg in argv):
        print(options.usage_text(bold=sys.stdout.isatty()))
        print()
        print(commands_text())
        return 0
    import torch
    from .evaluate import test_only
    from .parallel.launch import peer_failures_reported
    from .parallel.spawn import spawn_workers, workers_to_spawn
    from .run import build_run
    from .runplan import changed_params, plan_run
    from .train import train
    plan = plan_run(argv)
    if plan.opts.check_grads:       # spec §3.2: the check comes before every other mode
        return check_grads_command(plan)
    workers = workers_to_spawn(plan.opts)
    if workers > 1:
        del plan                # each worker reads the checkpoint itself
        return spawn_workers(argv, workers)
    with peer_failures_reported(), build_run(plan) as run:
        console = run.console
        if run.plan.state is None:
            for line in run.model.init_lines():
                console.line(line)
        for warning in run.model.warnings:
            console.line(f"warning: {warning}")
        for line in changed_params(run.plan, run.checkpointer.layer_params_text):
            console.line(line)
        console.write(report.import_banner(torch.__version__))
        if not run.test_only:
            console.write(report.training_banner(options.option_listing(run.opts),
                                                 run.cuda_devices, run.checkpointer.run_dir))
        if run.test_only:
            test_only(run)
        else:
            train(run)
    run.close()
    return 0


def check_grads_command(plan):
    """--check-grads 1: one block per matrix as soon as it is checked, the tally, and exit
    status 1 if any failed."""
    from .gradcheck import check_gradients, intro_lines, prepare_from_options, summary_line
    model, mats = prepare_from_options(plan.opts, plan.state)
    for line in intro_lines(model, mats):
        print(line, flush=True)
    results = []
    for result in check_gradients(model, mats):
        results.append(result)
        print("\n".join(result.lines()), flush=True)
    print(summary_line(results))
    return 0 if all(r.passed for r in results) else 1


def summary_command(argv):
    from . import summary
    return summary.main(argv)


def show_command(argv):
    from . import show
    args = show.parse_args(argv)
    paths = show.render(args)
    for path in paths:
        print(f"Wrote {path}")
    if args.show and not show.open_windows(paths):
        print("No display to open windows on; the plots are in the PNG files above.")
    return 0


def bench_command(argv):
    from . import bench
    return bench.main(argv)


def bench_scaling_command(argv):
    from . import bench_scaling
    return bench_scaling.main(argv)


def torchrun_command(argv):
    from .parallel.agent import torchrun_command
    return torchrun_command(argv)


COMMANDS = {"train": train_command, "summary": summary_command, "show": show_command,
            "bench": bench_command, "bench_scaling": bench_scaling_command,
            "torchrun": torchrun_command}
# What `--help` lists after the training options: (command, what it does).
COMMAND_HELP = [
    ("train", "train or test a net: the options above (the default; python convnet.py ...)"),
    ("summary", "a net's layers, output sizes and parameter count, from its cfg files"),
    ("show", "plot a checkpoint: cost curves, filters, predictions (python shownet.py ...)"),
    ("bench", "our trainer against the plain PyTorch scripts, side by side"),
    ("bench_scaling", "images/s on 1, 2, 4, 8 GPUs, strong and weak scaling"),
    ("torchrun", "torchrun with one-line errors: what launch/torchrun.sh runs on each node"),
]


def commands_text():
    width = max(len(name) for name, _ in COMMAND_HELP)
    return "\n".join(["Commands: python -m distconvnet COMMAND [options] "
                      "(COMMAND --help for its options)"] +
                     [f"    {name.ljust(width)}  {text}" for name, text in COMMAND_HELP])
