"""Command-line entry: argv -> subcommand. The one place that turns errors into one line + exit.

    python convnet.py ...                 (the original's command line; same as `train`)
    python -m distconvnet [train] ...
    python -m distconvnet summary --layer-def F --layer-params P [--inner-size N]
    python -m distconvnet show --load-file DIR ...   (python shownet.py ...: plots as PNG files)
"""

import argparse
import sys

from .errors import DistconvnetError

HELP_FLAGS = ("-h", "--help")


def main(argv=None):
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
    # The original printed its usage table for no arguments; -h and --help do too here.
    if not argv or any(arg in HELP_FLAGS for arg in argv):
        print(options.usage_text(bold=sys.stdout.isatty()))
        return 0
    import torch
    from .evaluate import test_only
    from .parallel.launch import peer_failures_reported
    from .parallel.spawn import spawn_workers, workers_to_spawn
    from .session import Session, plan_run
    from .train import train
    plan = plan_run(argv)
    if plan.opts.check_grads:       # spec §3.2: the check comes before every other mode
        return check_grads_command(plan)
    workers = workers_to_spawn(plan.opts)
    if workers > 1:
        del plan                # each worker reads the checkpoint itself
        return spawn_workers(argv, workers)
    with peer_failures_reported(), Session(argv, plan=plan) as session:
        console = session.console
        if session.state is None:
            for line in session.model.init_lines():
                console.line(line)
        for warning in session.model.warnings:
            console.line(f"warning: {warning}")
        for line in session.changed_params():
            console.line(line)
        console.write(report.import_banner(torch.__version__))
        if not session.test_only:
            console.write(report.training_banner(options.option_listing(session.opts),
                                                 session.cuda_devices, session.run_dir))
        if session.test_only:
            test_only(session)
        else:
            train(session)
    session.close()
    return 0


def check_grads_command(plan):
    """--check-grads 1: one block per matrix, the tally, and exit status 1 if any failed."""
    from .gradcheck import check_from_options, summary_line
    results = check_from_options(plan.opts, plan.state)
    for result in results:
        for line in result.lines():
            print(line)
    print(summary_line(results))
    return 0 if all(r.passed for r in results) else 1


def summary_command(argv):
    from .layers import BuildContext
    from .model import ConvNet
    parser = argparse.ArgumentParser(
        prog="distconvnet summary",
        description="Build a net from its cfg files and print the original's layer lines.")
    parser.add_argument("--layer-def", required=True)
    parser.add_argument("--layer-params", required=True)
    parser.add_argument("--inner-size", type=int, default=224,
                        help="crop size of the data layer's images (224 ImageNet, 24 CIFAR)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes of the data (checked against the softmax)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="also show, per layer, its replicas (gpu=) and which of N "
                             "processes runs each (spec §8)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    dims = {0: args.channels * args.inner_size ** 2, 1: 1}
    if args.num_classes:
        dims[2] = args.num_classes
    model = ConvNet(args.layer_def, args.layer_params,
                    BuildContext(dims.__getitem__, args.num_classes))
    for warning in model.warnings:
        print(f"warning: {warning}")
    for line in model.init_lines():
        print(line)
    print(f"Trainable parameters: {model.num_parameters():,}")
    if args.world_size is not None:
        from .parallel.plan import Plan, nodes_of
        plan = Plan(nodes_of(model))
        placement = plan.placement(args.world_size)
        print(f"Passes per minibatch: {plan.num_passes} (replicas: {plan.min_replicas} to "
              f"{plan.max_replicas}); {args.world_size} process(es) = "
              f"{placement.data_groups} data-parallel group(s) of {placement.group_size}")
        for line in placement.describe():
            print(line)
    return 0


def show_command(argv):
    from . import show
    args = show.parse_args(argv)
    paths = show.render(args)
    for path in paths:
        print(f"Wrote {path}")
    if args.show and not show.open_windows(paths):
        print("No display to open windows on; the plots are in the PNG files above.")
    return 0


COMMANDS = {"train": train_command, "summary": summary_command, "show": show_command}
