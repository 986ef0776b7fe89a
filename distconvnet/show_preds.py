"""shownet's --show-preds (spec §13): test images with the top-5 bars of a softmax layer, from a
net built from the checkpoint's cfg texts and weights, fed by the test provider."""

import math

import numpy as np
import torch

from .errors import CheckpointError, DataError, OptionError
from .layers import BuildContext
from .model import ConvNet
from .providers import ProviderOptions, make_provider
from .providers.cifar import CIFARDataProvider
from .show import new_figure, save

NUM_SHOWN_IMAGES = 8          # 2 rows x 4, as the original
TRUE_CLASS_COLOR, OTHER_CLASS_COLOR = "#ffaaaa", "#aaaaff"


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
