"""Checkpoint I/O: where checkpoints live, how they are written safely, and how they load.

Layout (spec §11, kept): `<save-path>/ConvNet__YYYY-MM-DD_HH.MM.SS/<epoch>.<batchnum>`, only the
newest file kept. Format (ours, portable and safe): one `torch.save` zip holding tensors, numbers,
strings, lists and dicts only, so it loads with `torch.load(weights_only=True)` and never runs
code. It contains the text of both cfg files, the weights and momentum buffers, the options,
the train/test histories, the position in the data and every RNG state.

Writes are atomic: the bytes go to a hidden temp file in the same directory, are fsync'ed, and
are renamed over the final name; only then are older checkpoints removed, with the temp files of
writers that were killed mid-save. A kill at any instant leaves the previous checkpoint (or the
new one) whole. A write that fails (a full disk) removes its temp file and stops the run with
one line; the previous checkpoint stays.
"""

import io
import os
import re
import time

import numpy as np
import torch

from .errors import CheckpointError
from .fileio import atomic_write, temp_target

FORMAT = "distconvnet-checkpoint"
VERSION = 1
_NAME_RE = re.compile(r"^(\d+)\.(\d+)$")


def new_run_dir(save_path, now=None):
    """The original's name: model name, empty options part, timestamp (hence the '__')."""
    stamp = time.strftime("%Y-%m-%d_%H.%M.%S", time.localtime(now))
    return os.path.join(save_path, f"ConvNet__{stamp}")


def save(run_dir, epoch, batchnum, state):
    """Atomically write `state` as `<run_dir>/<epoch>.<batchnum>`; remove older checkpoints.

    Only one process saves into a run directory (rank 0 of one job), so any other checkpoint
    temp file there was left by a writer that was killed."""
    name = f"{epoch}.{batchnum}"
    path = os.path.join(run_dir, name)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(path, buffer.getbuffer())
        for other in os.listdir(run_dir):
            if other != name and _NAME_RE.match(temp_target(other) or other):
                os.unlink(os.path.join(run_dir, other))
    except OSError as e:
        raise CheckpointError(f"Error saving checkpoint '{path}': {e.strerror or e} (the "
                              f"previous checkpoint is kept)") from None
    return path


def resolve(path):
    """A checkpoint directory (its newest checkpoint, by natural order) or a checkpoint file."""
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if _NAME_RE.match(n)]
        if not names:
            raise CheckpointError(f"Error loading checkpoint: no checkpoint in '{path}'")
        newest = max(names, key=lambda n: tuple(int(x) for x in _NAME_RE.match(n).groups()))
        return os.path.join(path, newest)
    if not os.path.exists(path):
        raise CheckpointError(f"Error loading checkpoint: Path '{path}' does not exist.")
    return path


def load_state(path, map_location="cpu"):
    """The raw state dict of a checkpoint, loaded without running any code."""
    file = resolve(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # damaged, truncated, or not ours: one line, whatever the cause
        raise CheckpointError(f"Error loading checkpoint: '{file}' is damaged or not a "
                              f"distconvnet checkpoint ({_load_failure(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"Error loading checkpoint: '{file}' is not a distconvnet "
                              "checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"Error loading checkpoint: '{file}' was written by a newer "
                              f"distconvnet (format {state['version']})")
    state["path"] = file
    return state


def _load_failure(error):
    """Why torch.load failed, in one line: its messages span many, with terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"\bGLOBAL ([\w.]+)", text)
    if refused:
        return f"it holds a Python object, {refused.group(1).rstrip('.')}, which is not loaded"
    # The weights-only unpickler's own reason follows a paragraph of advice; other messages
    # say what failed in their first sentence.
    text = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    first = re.split(r"(?<=\.)\s", " ".join(text.split()))[0]
    return f"{type(error).__name__}: {first}"[:300]


def load(path):
    """Public reader: the checkpoint as plain Python and numpy.

    Returns a dict with `weights` = {layer_name: {"weights": [arrays...], "biases": array}}
    (our torch layouts: conv (filters, channels/groups, k, k), fc (outputs, inputs), ...),
    `increments` in the same form (the momentum buffers), `epoch`, `batchnum`, `options`,
    `train_outputs`, `test_outputs`, `layer_def` and `layer_params` (cfg texts).
    """
    state = load_state(path)
    weights = {}
    for key, tensor in state["model"].items():
        m = re.match(r"^layers\.(.+)\.(weights\.(\d+)|biases)$", key)
        if not m:
            continue
        entry = weights.setdefault(m.group(1), {"weights": [], "biases": None})
        if m.group(3) is None:
            entry["biases"] = tensor.float().numpy()
        else:
            index = int(m.group(3))
            entry["weights"] += [None] * (index + 1 - len(entry["weights"]))
            entry["weights"][index] = tensor.float().numpy()
    return {"weights": weights,
            "increments": {k: {"weights": [np.asarray(a) for a in v["weights"]],
                               "biases": np.asarray(v["biases"])}
                           for k, v in state.get("increments", {}).items()},
            "epoch": state["epoch"], "batchnum": state["batchnum"], "options": state["options"],
            "train_outputs": state["train_outputs"], "test_outputs": state["test_outputs"],
            "layer_def": state["layer_def"], "layer_params": state["layer_params"],
            "path": state["path"]}
