"""shownet (spec §13): a checkpoint's cost curves, filters and test predictions as PNG files.

    python shownet.py --load-file DIR [--show-cost logprob [--cost-idx 1]] [--show-filters conv1]
                      [--show-preds probs [--only-errors 1]] [--save-dir DIR] [--show 1]

It reads the checkpoint through checkpoint.load and never builds a trainer: predictions come
from a net built from the checkpoint's cfg texts and weights, fed by the test provider. Figures
are drawn on matplotlib's Agg canvas (no display needed); `--show 1` then opens the files in
windows when there is a display. docs/show.md lists our defaults and differences.
"""

import argparse
import math
import os
import sys

import numpy as np
import torch

from . import checkpoint
from .cfg import read_cfg
from .errors import CheckpointError, DataError, OptionError
from .layers import BuildContext
from .model import ConvNet
from .options import Options, RangeType
from .providers import ProviderOptions, make_provider
from .providers.cifar import CIFARDataProvider

FILTERS_PER_ROW = 16
MAX_ROWS = 24
NUM_SHOWN_IMAGES = 8          # 2 rows x 4, as the original
TRUE_CLASS_COLOR, OTHER_CLASS_COLOR = "#ffaaaa", "#aaaaff"
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


# -- predictions -----------------------------------------------------------------------------------

def plot_predictions(ckpt, opts, args, save_dir):
    """8 images of the first test batch (random, or among the misclassified) with the top-5
    bars of the --show-preds softmax layer; the true class's bar is red."""
    device = torch.device("cuda", args.gpu) if torch.cuda.is_available() else torch.device("cpu")
    test_range = args.test_range or opts.test_batch_range
    options = ProviderOptions(inner_size=opts.inner_size, scalar_mean=opts.scalar_mean,
                              seed=opts.seed or 0, device=device, minibatch=opts.minibatch_size)
    provider = make_provider(opts.dp_type, args.data_path or opts.data_path, test_range[:1],
                             test=True, options=options)
    try:
        net = build_net(ckpt, provider, device)
        layer = args.show_preds
        if layer not in net.layers or net.layers[layer].type_name != "softmax":
            softmaxes = [n for n, m in net.layers.items() if m.type_name == "softmax"]
            raise OptionError(f"--show-preds: '{layer}' is not a softmax layer of this net "
                              f"(softmax layers: {', '.join(softmaxes) or 'none'})")
        batch = provider.get_next_batch()
        images, labels = batch.mats[0], batch.mats[1].reshape(-1).long().cpu().numpy()
        if images.dim() != 4:
            raise DataError(f"--show-preds: provider '{opts.dp_type}' gives no images to show")
        rows, probs = pick_cases(net, batch.mats, layer, labels, args.only_errors,
                                 batch.batchnum)
        pixels = restore_pixels(provider, images[torch.as_tensor(rows, device=device)])
        names = [str(n).split(",")[0] for n in provider.batch_meta.get(
            "label_names", range(probs.shape[1]))]
    finally:
        if hasattr(provider, "close"):
            provider.close()
    title = "Mistaken test samples" if args.only_errors else "Random test samples"
    fig = draw_predictions(pixels, labels[rows], probs, names, title)
    prefix = "errors" if args.only_errors else "preds"
    return save(fig, save_dir, f"{prefix}-{layer}.png")


def build_net(ckpt, provider, device):
    """The checkpoint's net from its own cfg texts, with its weights, in eval mode."""
    ctx = BuildContext(provider.get_data_dims, provider.get_num_classes())
    net = ConvNet.from_checkpoint(ckpt["path"], ckpt["layer_def"], ctx,
                                  layer_params_text=ckpt["layer_params"])
    for name, entry in ckpt["weights"].items():
        layer = net.layers[name]
        for param, array in zip([*layer.weights, layer.biases],
                                [*entry["weights"], entry["biases"]]):
            if tuple(param.shape) != array.shape:
                raise CheckpointError(f"{ckpt['path']}: layer '{name}' has weights of shape "
                                      f"{array.shape}, but its cfg gives {tuple(param.shape)}")
            param.data.copy_(torch.from_numpy(array))
    return net.to(device).eval()


def pick_cases(net, mats, layer, labels, only_errors, batchnum):
    """(rows, their probabilities): random rows, or random misclassified ones."""
    rng = np.random.default_rng()
    cases = labels.shape[0]
    if not only_errors:
        rows = np.sort(rng.choice(cases, min(NUM_SHOWN_IMAGES, cases), replace=False))
        return rows, probabilities(net, mats, layer, rows)
    probs = probabilities(net, mats, layer, np.arange(cases))
    wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
    if wrong.size == 0:
        raise DataError(f"--only-errors: the net classifies all {cases} images of test batch "
                        f"{batchnum} correctly")
    rows = np.sort(rng.choice(wrong, min(NUM_SHOWN_IMAGES, wrong.size), replace=False))
    return rows, probs[rows]


def probabilities(net, mats, layer, rows, chunk=256):
    outputs = []
    with torch.no_grad():
        for part in np.array_split(rows, max(1, math.ceil(len(rows) / chunk))):
            index = torch.as_tensor(part, device=mats[0].device)
            outputs.append(net([m[index] for m in mats], keep=[layer]).acts[layer].float().cpu())
    return torch.cat(outputs).flatten(1).numpy()


def restore_pixels(provider, images):
    """Add back what the provider subtracted (spec §10.3-10.4) -> (N, S, S, C) in [0, 1]."""
    if getattr(provider, "mean_crop", None) is not None:
        images = images + provider.mean_crop
    scalar = float(provider.options.scalar_mean)
    # cifar subtracts --scalar-mean even at its default -1 (spec §15.7); image only when >= 0
    if isinstance(provider, CIFARDataProvider) or scalar >= 0:
        images = images + scalar
    return (images.clamp(0, 255) / 255).permute(0, 2, 3, 1).cpu().numpy()


def draw_predictions(pixels, labels, probs, names, title):
    fig = new_figure(1000, 820)
    fig.suptitle(title, fontsize=16)
    cells = fig.add_gridspec(2, 4, left=0.02, right=0.98, bottom=0.02, top=0.9, hspace=0.15,
                             wspace=0.1)
    top = min(5, probs.shape[1])
    for k, (image, label, p) in enumerate(zip(pixels, labels, probs)):
        picture, chart = cells[divmod(k, 4)].subgridspec(2, 1, height_ratios=[3, 2], hspace=0.05)
        ax = fig.add_subplot(picture)
        ax.imshow(image.repeat(3, axis=2) if image.shape[2] == 1 else image,
                  interpolation="lanczos")
        ax.set(xticks=[], yticks=[])
        ax.set_title(names[label], fontsize=14, fontweight="bold")
        bars = fig.add_subplot(chart)
        best = np.argsort(p)[-top:]          # ascending, so the most likely class is on top
        bars.barh(np.arange(top), p[best], height=0.8,
                  color=[TRUE_CLASS_COLOR if c == label else OTHER_CLASS_COLOR for c in best])
        for y, c in enumerate(best):
            bars.text(0.02, y, names[c], va="center", fontsize=9, fontweight="bold")
        bars.set(xlim=(0, 1), ylim=(-0.5, top - 0.5), xticks=[], yticks=[])
    return fig
