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

Loads are checked: every record of the zip against the CRC-32 its writer stored (torch's reader
does not look at them); a damaged record is named, with the tensors it holds. A resume also
checks the contents (check_resumable): the entries it reads, of the right types, options of the
types of their command-line options; the net's tensors are compared with the net's shapes
before they are copied.
"""

import contextlib
import io
import os
import re
import struct
import time
import zipfile
import zlib

import numpy as np
import torch

from . import options
from .errors import CheckpointError, brief
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


def is_checkpoint_name(name):
    return _NAME_RE.match(name) is not None


def position(name):
    """(epoch, batchnum) of a checkpoint's file name: its natural order."""
    return tuple(int(x) for x in _NAME_RE.match(name).groups())


def resolve(path):
    """A checkpoint directory (its newest checkpoint, by natural order) or a checkpoint file."""
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if is_checkpoint_name(n)]
        if not names:
            raise CheckpointError(f"Error loading checkpoint: no checkpoint in '{path}'")
        return os.path.join(path, max(names, key=position))
    if not os.path.exists(path):
        raise CheckpointError(f"Error loading checkpoint: Path '{path}' does not exist.")
    return path


def load_state(path, map_location="cpu"):
    """The raw state dict of a checkpoint, loaded without running any code."""
    for attempt in range(3):
        file = resolve(path)
        try:
            _verify_records(file)
            state = torch.load(file, map_location=map_location, weights_only=True)
            break
        except FileNotFoundError:
            # A run saving into that directory replaced its newest checkpoint meanwhile.
            if not os.path.isdir(path) or attempt == 2:
                raise CheckpointError(f"Error loading checkpoint: '{file}' disappeared while "
                                      f"it was read") from None
        except CheckpointError:
            raise
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


def check_resumable(state):
    """A loaded state has what a resume reads, of the right types (see _ENTRIES)."""
    problem = _content_problem(state)
    if problem:
        raise CheckpointError(f"Error loading checkpoint: '{state['path']}' is incomplete or "
                              f"damaged: {problem}")
    return state


# What a resume reads, and its type.
_ENTRIES = {"options": dict, "layer_def": str, "layer_params": str, "model": dict,
            "optimizer": dict, "epoch": int, "batchnum": (int, type(None)),
            "train_outputs": list, "test_outputs": list, "train_cursor": list,
            "train_data": dict, "test_data": dict, "rng": dict}


def _content_problem(state):
    for key, kind in _ENTRIES.items():
        if key not in state:
            return f"it has no '{key}'"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its '{key}' is {type(state[key]).__name__} {brief(state[key])}"
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "it has no random state ('rng' lacks 'torch')"
    if len(state["train_cursor"]) != 2:
        return f"its 'train_cursor' is {brief(state['train_cursor'])}, not (epoch, batch)"
    for key, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            return f"its model entry '{key}' is {type(value).__name__}, not a tensor"
    saved = state["options"]
    if not isinstance(saved.get("values"), dict) or not isinstance(saved.get("given"), list):
        return "its 'options' lack their values"
    return options.stored_value_problem(saved["values"])


def check_tensors(saved, expected, file):
    """`saved` (a state dict) has exactly the tensors of `expected`, shape for shape."""
    for key, tensor in expected.items():
        if key not in saved:
            raise CheckpointError(f"Error loading checkpoint: '{file}' lacks the tensor '{key}' "
                                  f"of its net")
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"Error loading checkpoint: '{file}': tensor '{key}' has "
                                  f"shape {tuple(saved[key].shape)}; its net needs "
                                  f"{tuple(tensor.shape)}")
    for key in saved:
        if key not in expected:
            raise CheckpointError(f"Error loading checkpoint: '{file}' holds a tensor '{key}' "
                                  f"that its net does not have")


@contextlib.contextmanager
def restoring(file, part):
    """Restore `part` of checkpoint `file`; whatever does not fit is one line naming both."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"Error loading checkpoint: '{file}': its {part} does not fit: "
                              f"{e}") from None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"Error loading checkpoint: '{file}': its {part} does not fit "
                              f"({type(e).__name__}: {reason})") from None


def _verify_records(file):
    """Check every record of the checkpoint's zip against its CRC-32; name a damaged one and
    the tensors it holds. A file that is no zip at all is left to torch.load to describe."""
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
            info = archive.getinfo(damaged) if damaged else None
    except (zipfile.BadZipFile, OSError, EOFError):
        return
    if info is not None:
        held = _tensors_in_record(file, info)
        raise CheckpointError(f"Error loading checkpoint: '{file}' is damaged: record "
                              f"'{info.filename}'{f' ({held})' if held else ''} fails its "
                              f"CRC-32 check")


def _tensors_in_record(file, info):
    """Which tensors a damaged data record holds: those whose bytes, as torch reads them, have
    the record's (damaged) CRC-32. Empty when it holds none (e.g. the pickled data.pkl)."""
    if info.compress_type != zipfile.ZIP_STORED or "/data/" not in info.filename:
        return ""
    with open(file, "rb") as f:
        f.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        crc = zlib.crc32(f.read(info.compress_size))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # too damaged to read at all: the record's name is what we have
        return ""
    found = [path for path, tensor in _tensor_paths(state)
             if zlib.crc32(_storage_bytes(tensor)) == crc]
    return "tensor " + ", ".join(found[:3]) if found else ""


def _tensor_paths(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensor_paths(value, f"{path}[{key!r}]" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensor_paths(value, f"{path}[{i}]")


def _storage_bytes(tensor):
    storage = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return storage.numpy().tobytes()


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
