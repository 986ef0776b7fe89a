"""shownet (spec §13): a checkpoint's cost curves, filters and test predictions as PNG files.

    python shownet.py --load-file DIR [--show-cost logprob [--cost-idx 1]] [--show-filters conv1]
                      [--show-preds probs [--only-errors 1]] [--save-dir DIR] [--show 1]

It reads the checkpoint through checkpoint.load and never builds a trainer: predictions come
from a net built from the checkpoint's cfg texts and weights, fed by the test provider. Figures
are drawn on matplotlib's Agg canvas (no display needed); `--show 1` then opens the files in
windows when there is a display. The README (shownet) lists our defaults and differences.
"""

import argparse
import math
import os
import sys

import numpy as np

from . import checkpoint
from .cfg import read_cfg
from .errors import CheckpointError, OptionError
from .options import Options
from .optiontypes import RangeType

FILTERS_PER_ROW = 16
MAX_ROWS = 24
DPI = 100
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def _batch_range(text):
    try:
        return RangeType().parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) or f"expected N or N-M, got {text!r}")


BOOL = "0/1"
OPTIONS = [   # flag, type, default, help: the original's options (spec §13), then ours
    ("--load-file", str, "", "checkpoint directory (or file) to show"),
    ("--show-cost", str, "", "cost layer whose curves to plot (default: every cost)"),
    ("--cost-idx", int, None, "which value of the cost (default: a panel for each)"),
    ("--smooth-test-errors", BOOL, 1, "running mean of the test value (--test-one runs)"),
    ("--show-filters", str, "", "layer whose filters to draw"),
    ("--input-idx", int, 0, "which weight matrix (input) of that layer"),
    ("--norm-filters", BOOL, 0, "normalise each filter before the global scaling"),
    ("--no-rgb", BOOL, 0, "draw 3-channel filters as 3 gray tiles"),
    ("--yuv-to-rgb", BOOL, 0, "convert YUV filters to RGB"),
    ("--channels", int, 0, "channels of an fc layer's input images (default: 3 or 1)"),
    ("--local-plane", int, 0, "local layers: which filter to draw at every position"),
    ("--show-preds", str, "", "softmax layer whose test predictions to draw"),
    ("--only-errors", BOOL, 0, "only misclassified test images"),
    ("--data-path", str, "", "test data (default: the checkpoint's)"),
    ("--test-range", _batch_range, None, "test batches (default: the checkpoint's; "
     "predictions use the first)"),
    ("--gpu", int, 0, "CUDA device for predictions, when there is one"),
    ("--save-dir", str, "", "where the PNG files go (default: the checkpoint directory)"),
    ("--show", BOOL, 0, "also open the plots in windows, when there is a display"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="shownet.py", description="Plot a checkpoint: cost "
                                     "curves, filters, test predictions (PNG files).")
    for flag, kind, default, text in OPTIONS:
        typed = {"type": int, "choices": (0, 1)} if kind is BOOL else {"type": kind}
        parser.add_argument(flag, default=default, help=text, **typed)
    parser.add_argument("--debug", type=int, choices=(0, 1), nargs="?", const=1, default=0,
                        help="show tracebacks on errors")
    return parser.parse_args(argv)


def render(args):
    """Write the asked-for plots; returns the paths of the PNG files."""
    if not args.load_file:
        raise OptionError("--load-file is required: the checkpoint directory to show")
    if args.only_errors and not args.show_preds:
        raise OptionError("--only-errors 1 needs --show-preds SOFTMAX_LAYER")
    ckpt = checkpoint.load(args.load_file)
    opts = Options.from_dict(ckpt["options"])
    save_dir = args.save_dir or os.path.dirname(ckpt["path"])
    os.makedirs(save_dir, exist_ok=True)
    costs = [args.show_cost] if args.show_cost else []
    if not (args.show_cost or args.show_filters or args.show_preds):
        costs = list(ckpt["train_outputs"][0][0]) if ckpt["train_outputs"] else []
    paths = [plot_cost(ckpt, opts, name, args.cost_idx, args.smooth_test_errors, save_dir)
             for name in costs]
    if args.show_filters:
        paths.append(plot_filters(ckpt, args, save_dir))
    if args.show_preds:
        from .show_preds import plot_predictions
        paths.append(plot_predictions(ckpt, opts, args, save_dir))
    if not paths:
        raise CheckpointError(f"{ckpt['path']}: no training history to plot")
    return paths


def open_windows(paths):
    """Show the written PNGs in windows; False when there is no display to show them on."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            or sys.platform in ("darwin", "win32")):
        return False
    import matplotlib.pyplot as plt
    if plt.get_backend().lower() in _NON_INTERACTIVE:
        return False
    for path in paths:
        fig = plt.figure(os.path.basename(path))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(plt.imread(path))
        ax.axis("off")
    plt.show()
    return True


def new_figure(width_px, height_px):
    """A Figure on the Agg canvas, sized in pixels at DPI (pyplot and its backends untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, save_dir, name):
    # Names hold layer names, which a checkpoint supplies: each makes one file in save_dir.
    path = os.path.join(save_dir, name.replace(os.sep, "_"))
    fig.savefig(path, dpi=DPI)
    return path


# -- cost curves -----------------------------------------------------------------------------------

def smoothed_test_values(test_outputs, name, idx, window):
    """Per test event: the case-weighted mean of sums[idx] over the last `window` events."""
    sums = np.array([s[name][idx] for s, _ in test_outputs], dtype=np.float64)
    cases = np.array([max(c, 1) for _, c in test_outputs], dtype=np.float64)
    kernel = np.ones(window)
    return np.convolve(sums, kernel)[:len(sums)] / np.convolve(cases, kernel)[:len(cases)]


def per_batch_test_values(test_values, num_batches, test_freq):
    """Each test value held over the training batches since the previous test, as the
    original's tiling did; event k follows batch min((k+1)*test_freq, last), the last event
    being the run's final test when it did not fall on a multiple of test_freq."""
    events = np.minimum(np.arange(1, len(test_values) + 1) * test_freq, num_batches)
    held = np.searchsorted(events, np.arange(1, num_batches + 1))
    return test_values[np.minimum(held, len(test_values) - 1)]


def value_names(ckpt, name, count):
    """What each value of a cost is, for the panels' titles: a logreg cost's are the mean
    -log p(label) and the top-1 and top-k error rates; other costs' values are numbered."""
    section = read_cfg("(checkpoint layer-def)", ckpt["layer_def"]).get(name)
    if section is not None and section.str("type", "") == "cost.logreg" and count == 3:
        params = read_cfg("(checkpoint layer-params)", ckpt["layer_params"]).get(name)
        topk = params.int("topk", 1) if params is not None else 1
        return ["logprob", "top-1 error", f"top-{topk} error"]
    return [f"{name}[{i}]" for i in range(count)]


def plot_cost(ckpt, opts, name, cost_idx, smooth, save_dir):
    train, test = ckpt["train_outputs"], ckpt["test_outputs"]
    if not train:
        raise CheckpointError(f"{ckpt['path']}: no training history to plot")
    known = list(train[0][0])
    if name not in known:
        raise OptionError(f"--show-cost: no cost '{name}' in this checkpoint "
                          f"(costs: {', '.join(known)})")
    count = len(train[0][0][name])
    if cost_idx is not None and not 0 <= cost_idx < count:
        raise OptionError(f"--cost-idx {cost_idx}: cost '{name}' has {count} values "
                          f"(0-{count - 1})")
    indices = range(count) if cost_idx is None else [cost_idx]
    titles = value_names(ckpt, name, count)
    per_epoch = len(opts.train_batch_range)
    window = len(opts.test_batch_range) if smooth and opts.test_one else 1
    x = np.arange(1, len(train) + 1) / per_epoch
    fig = new_figure(800, 60 + 260 * len(indices))
    axes = fig.subplots(len(indices), 1, sharex=True, squeeze=False)[:, 0]
    for ax, idx in zip(axes, indices):
        # spec §13: a training batch's value is its sums[idx] / cases
        ax.plot(x, [s[name][idx] / max(c, 1) for s, c in train], "k-", label="Training set")
        if test:
            values = smoothed_test_values(test, name, idx, window)
            ax.plot(x, per_batch_test_values(values, len(train), opts.testing_freq), "r-",
                    drawstyle="steps-pre", label="Test set")
        ax.set_title(titles[idx])
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[-1].set_xlabel("Epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    suffix = "" if cost_idx is None else f"-{cost_idx}"
    return save(fig, save_dir, f"cost-{name}{suffix}.png")


# -- filters ---------------------------------------------------------------------------------------

def filter_matrix(ckpt, args):
    """(filters (channels, pixels, count) float64, count per grid row) for --show-filters."""
    name, idx = args.show_filters, args.input_idx
    cfg, weights = read_cfg("(checkpoint layer-def)", ckpt["layer_def"]), ckpt["weights"]
    sections = {sec.name: sec for sec in cfg.sections}
    drawable = [n for n, s in sections.items() if s.str("type") in ("conv", "local", "fc")]
    if name not in sections:
        raise OptionError(f"--show-filters: no layer '{name}' in this net (layers with "
                          f"filters: {', '.join(drawable)})")
    kind = sections[name].str("type")
    if kind not in ("conv", "local", "fc") or name not in weights:
        raise OptionError(f"--show-filters: layer '{name}' ({kind}) has no filters to show "
                          f"(layers with filters: {', '.join(drawable)})")
    matrices = weights[name]["weights"]
    if not 0 <= idx < len(matrices):
        raise OptionError(f"--input-idx {idx}: layer '{name}' has {len(matrices)} weight "
                          f"matrices (0-{len(matrices) - 1})")
    w = matrices[idx].astype(np.float64)
    if kind == "conv":                       # (filters, channels/groups, k, k)
        count, channels = w.shape[:2]
        return w.reshape(count, channels, -1).transpose(1, 2, 0), FILTERS_PER_ROW
    if kind == "local":                      # (modules, groups, channels*k*k, filters)
        modules, groups, rows, filters = w.shape
        if not 0 <= args.local_plane < groups * filters:
            raise OptionError(f"--local-plane {args.local_plane}: layer '{name}' has "
                              f"{groups * filters} filters (0-{groups * filters - 1})")
        group, plane = divmod(args.local_plane, filters)
        sizes = sections[name].str("filterSize").split(",")
        size = int(sizes[idx if len(sizes) > 1 else 0])
        plane_weights = w[:, group, :, plane].reshape(modules, rows // size ** 2, size ** 2)
        return plane_weights.transpose(1, 2, 0), math.isqrt(modules)
    outputs, inputs = w.shape                # fc: (outputs, inputs)
    channels = args.channels or next((c for c in (3, 1) if _is_square(inputs / c)), 0)
    if not channels or inputs % channels or not _is_square(inputs // channels):
        raise OptionError(f"--channels: fc layer '{name}' reads {inputs} values; give "
                          f"--channels C such that {inputs} / C is a square image")
    return w.reshape(outputs, channels, -1).transpose(1, 2, 0), FILTERS_PER_ROW


def _is_square(n):
    return n == int(n) and n >= 1 and math.isqrt(int(n)) ** 2 == int(n)


def scale_filters(filters, yuv_to_rgb, norm_filters):
    """YUV->RGB, per-filter zero mean / unit variance, then global min-max to [0, 1]."""
    if yuv_to_rgb and filters.shape[0] == 3:
        y, u, v = filters
        filters = np.stack([y + 1.28033 * v, y - 0.21482 * u - 0.38059 * v, y + 2.12798 * u])
    if norm_filters:
        flat = filters.reshape(-1, filters.shape[2])
        filters = (filters - flat.mean(axis=0)) / np.maximum(flat.std(axis=0), 1e-12)
    span = filters.max() - filters.min()
    return (filters - filters.min()) / (span if span > 0 else 1.0)


def filter_grid(filters, per_row, combine_channels):
    """The original's picture: filters in a grid with 1-pixel black separators, at most
    MAX_ROWS rows; gray mode draws a filter's channels side by side. Returns (picture
    (H, W, 3), number of filters drawn)."""
    channels, pixels, count = filters.shape
    size = math.isqrt(pixels)
    across = 1 if combine_channels else channels
    f_per_row = max(1, math.ceil(per_row / across))
    shown = min(count, f_per_row * MAX_ROWS)
    rows = math.ceil(shown / f_per_row)
    cell_w = size * across
    picture = np.zeros((rows * (size + 1) + 1, f_per_row * (cell_w + 1) + 1, 3))
    for m in range(shown):
        top = 1 + (size + 1) * (m // f_per_row)
        left = 1 + (cell_w + 1) * (m % f_per_row)
        tiles = filters[:, :, m].reshape(channels, size, size)
        if combine_channels:
            picture[top:top + size, left:left + size] = tiles.transpose(1, 2, 0)
        else:
            picture[top:top + size, left:left + cell_w] = \
                tiles.transpose(1, 0, 2).reshape(size, cell_w)[:, :, None]
    return picture, shown


def plot_filters(ckpt, args, save_dir):
    filters, per_row = filter_matrix(ckpt, args)
    filters = scale_filters(filters, args.yuv_to_rgb, args.norm_filters)
    combine = filters.shape[0] == 3 and not args.no_rgb
    picture, shown = filter_grid(filters, per_row, combine)
    size = math.isqrt(filters.shape[1])
    height, width = picture.shape[:2]
    zoom = max(1, min(800 // width, 900 // height))     # whole screen pixels per filter pixel
    title_px = 30
    fig = new_figure(width * zoom, height * zoom + title_px)
    ax = fig.add_axes([0, 0, 1, height * zoom / (height * zoom + title_px)])
    ax.imshow(picture, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.5 * title_px / (height * zoom + title_px),
             f"Layer {args.show_filters} {size}x{size} filters 0-{shown - 1}",
             ha="center", va="center")
    suffix = f"-{args.input_idx}" if args.input_idx else ""
    return save(fig, save_dir, f"filters-{args.show_filters}{suffix}.png")
