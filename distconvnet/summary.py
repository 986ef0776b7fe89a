"""`python -m distconvnet summary`: a net's layer lines and parameter count, without training.

The sizes of every layer follow from the input's, so the input size must come from somewhere
true: --inner-size (the crop the trainer would take), or the image size in --data-path's
batches.meta (what the trainer feeds with --inner-size 0). With neither, it refuses to guess.
"""

import argparse
import math

from .errors import DataError, OptionError

NUM_COLORS = 3


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
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def input_size(args):
    """(image side, where it came from, number of classes or None)."""
    if args.inner_size is not None and args.inner_size < 1:
        raise OptionError(f"--inner-size {args.inner_size}: expected a positive image size")
    if args.data_path is None:
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


def main(argv):
    from .layers import BuildContext
    from .model import ConvNet
    args = parse_args(argv)
    side, source, num_classes = input_size(args)
    print(f"Input: {side}x{side} {args.channels}-channel images (from {source})")
    dims = {0: args.channels * side ** 2, 1: 1}
    if num_classes:
        dims[2] = num_classes
    model = ConvNet(args.layer_def, args.layer_params,
                    BuildContext(dims.__getitem__, num_classes))
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
