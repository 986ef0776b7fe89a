"""`python -m distconvnet summary`: a net's layer lines and parameter count, without training.

The sizes of every layer follow from the input's, so the input size must come from somewhere
true: --inner-size (the crop the trainer would take), or the image size in --data-path's
batches.meta (what the trainer feeds with --inner-size 0). With neither, it refuses to guess,
except for `--world-size N --program` alone: which rank runs what does not depend on the input
size, so the net is then built at the smallest square input it accepts, and its layer sizes
are not printed.
"""

import argparse
import math

from .errors import ConfigError, DataError, OptionError

NUM_COLORS = 3
MAX_PROBED_SIDE = 1024


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m distconvnet summary",
        description="Build a net from its cfg files and print the original's layer lines and "
                    "its parameter count. The input size comes from --inner-size, or else from "
                    "--data-path's batches.meta.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layer-def", required=True)
    parser.add_argument("--layer-params", required=True)
    parser.add_argument("--inner-size", type=int, default=None,
                        help="crop size of the data layer's images, as given to training "
                             "(224 for the ImageNet nets, 24 for CIFAR)")
    parser.add_argument("--data-path", default=None,
                        help="a folder of data batches: its batches.meta gives the image size "
                             "(when --inner-size is not given) and the number of classes")
    parser.add_argument("--channels", type=int, default=NUM_COLORS)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes of the data (checked against the softmax)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="also show, per layer, its replicas (gpu=) and which of N "
                             "processes runs each (spec §8)")
    parser.add_argument("--program", action="store_true",
                        help="with --world-size: also print each rank's program, what it "
                             "runs, sends and receives on each pass of a minibatch")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def input_size(args):
    """(image side or None for "the smallest the net accepts", where it came from, number of
    classes or None)."""
    if args.inner_size is not None and args.inner_size < 1:
        raise OptionError(f"--inner-size {args.inner_size}: expected a positive image size")
    if args.data_path is None:
        if args.inner_size is None and args.program:
            return None, None, args.num_classes
        if args.inner_size is None:
            raise OptionError("summary needs the input size: give --inner-size N (224 for the "
                              "ImageNet nets, 24 for CIFAR) or --data-path DIR (its "
                              "batches.meta)")
        return args.inner_size, "--inner-size", args.num_classes
    from .providers.batches import META_NAME, load_meta
    meta = load_meta(args.data_path)
    where = f"{args.data_path}/{META_NAME}"
    num_classes = args.num_classes or len(meta.get("label_names") or []) or None
    if args.inner_size is not None:
        return args.inner_size, "--inner-size", num_classes
    if "img_size" in meta:
        return int(meta["img_size"]), where, num_classes
    num_vis = int(meta.get("num_vis", 0))
    side = math.isqrt(num_vis // args.channels) if num_vis > 0 else 0
    if side == 0 or args.channels * side * side != num_vis:
        raise DataError(f"{where}: no 'img_size', and 'num_vis' = {num_vis} is not "
                        f"{args.channels} x S x S: give --inner-size")
    return side, where, num_classes


def build(args, side, num_classes):
    from .layers import BuildContext
    from .model import ConvNet
    dims = {0: args.channels * side ** 2, 1: 1}
    if num_classes:
        dims[2] = num_classes
    return ConvNet(args.layer_def, args.layer_params, BuildContext(dims.__getitem__, num_classes))


def smallest_net(args, num_classes):
    """(side, net) of the smallest square input, up to MAX_PROBED_SIDE, that the net accepts;
    the last refusal if none."""
    for side in range(1, MAX_PROBED_SIDE + 1):
        try:
            return side, build(args, side, num_classes)
        except ConfigError as e:
            refusal = e
    raise refusal


def main(argv):
    args = parse_args(argv)
    if args.program and args.world_size is None:
        raise OptionError("--program shows the ranks' programs: give --world-size N")
    side, source, num_classes = input_size(args)
    if side is None:
        side, model = smallest_net(args, num_classes)
        print(f"Input: none given; the ranks' programs do not depend on it (the net accepts "
              f"{side}x{side} {args.channels}-channel images and up)")
    else:
        print(f"Input: {side}x{side} {args.channels}-channel images (from {source})")
        model = build(args, side, num_classes)
    for warning in model.warnings:
        print(f"warning: {warning}")
    if source is not None:
        for line in model.init_lines():
            print(line)
        print(f"Trainable parameters: {model.num_parameters():,}")
    if args.world_size is not None:
        print_placement(model, args.world_size, args.program)
    return 0


def print_placement(model, world_size, program):
    from .parallel.plan import Plan, nodes_of
    from .parallel.program import RankProgram
    plan = Plan(nodes_of(model))
    placement = plan.placement(world_size)
    print(f"Passes per minibatch: {plan.num_passes} (replicas: {plan.min_replicas} to "
          f"{plan.max_replicas}); {world_size} process(es) = "
          f"{placement.data_groups} data-parallel group(s) of {placement.group_size}")
    for line in placement.describe():
        print(line)
    if not program:
        return
    print("Each rank's program for one minibatch (x[r]: replica r of layer x's output; for a "
          "data layer, microbatch r):")
    for rank in range(world_size):
        for line in RankProgram(placement, model.reads(), rank).describe():
            print(line)
