"""cuda-convnet2 data batches: reading, writing, and what every provider shares.

Format knowledge lives here once (spec §10.1, §10.4): `batches.meta` and `data_batch_<N>`, where
a batch is either one pickle file (CIFAR) or a directory of sub-files `data_batch_<N>.0, .1, ...`
(ImageNet). All reading goes through `safepickle`, so a batch file can never run code.

Also here: the provider contract (`Provider`, with its small types `ProviderOptions` and
`DataBatch`, and `CursorProvider`, what every provider shares), the (epoch, batchnum) cursor in
ccn2's order (spec §2) and the per-batch random generator.
"""

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from .. import safepickle
from ..fileio import atomic_write, temp_sibling
from ..errors import DataError, brief

META_NAME = "batches.meta"
_BATCH_NAME = re.compile(r"data_batch_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ProviderOptions:
    """The command-line knobs a provider reads (spec §3.2 names in the comments)."""

    inner_size: int = 0              # --inner-size; 0 = the full image
    color_noise: float = 0.0         # --color-noise (image provider)
    scalar_mean: float = -1.0        # --scalar-mean; see cifar.py for the -1 quirk
    multiview: bool = False          # --multiview-test (only used when test=True)
    seed: int = 0                    # our addition: ccn2 had no seed (spec §15 item 5)
    device: torch.device = torch.device("cpu")
    minibatch: int = 128             # --mini; the unit of sharding
    skip_bad_images: bool = False    # image provider: drop undecodable JPEGs instead of failing


class DataBatch(NamedTuple):
    """One data batch: mats[0] images (N, C, S, S) float32, mats[1] labels (N,) float32, ...

    With multiview, N = num_views x cases stacked view-major (row N*v + i) and labels tiled.
    """

    epoch: int
    batchnum: int
    mats: list
    num_views: int


# ---------------------------------------------------------------------------------------------
# Reading


def batch_path(data_path, n):
    return Path(data_path) / f"data_batch_{n}"


def list_batches(data_path):
    """Sorted numbers of the `data_batch_<N>` files or directories in `data_path`."""
    path = Path(data_path)
    if not path.is_dir():
        raise DataError(f"{path}: data directory does not exist")
    found = (_BATCH_NAME.match(entry.name) for entry in path.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def format_ranges(numbers):
    """[1, 2, 3, 6] -> '1-3, 6' (how missing-batch errors list what exists)."""
    runs = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def load_meta(data_path):
    path = Path(data_path) / META_NAME
    if not path.is_file():
        raise DataError(f"{path}: batches.meta not found (expected a pickled dict)")
    meta = safepickle.load(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(meta).__name__}")
    return meta


def meta_int(data_path, meta, key, default, minimum=None):
    """batches.meta's integer `key` (e.g. img_size), or one line saying what it holds instead."""
    value = meta.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or isinstance(value, float) and value != number or \
            minimum is not None and number < minimum:
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DataError(f"{Path(data_path) / META_NAME}: expected '{key}' to be {wanted}, "
                        f"got {brief(value)}")
    return number


def require_batches(data_path, batch_numbers):
    """Fail early, with what exists, if any batch of a range is missing (cheap: no reading)."""
    for n in batch_numbers:
        if not batch_path(data_path, n).exists():
            _raise_missing(data_path, n)


def _raise_missing(data_path, n):
    available = format_ranges(list_batches(data_path))
    raise DataError(f"data batch {n} not found in {data_path} (available: {available})")


def _load_dict(path):
    value = safepickle.load(path)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(value).__name__}")
    return value


def sub_batch_files(directory):
    """data_batch_N.0, .1, ... in numeric order; a gap or an empty directory is an error."""
    pattern = re.compile(re.escape(directory.name) + r"\.(\d+)$")
    found = (pattern.match(entry.name) for entry in directory.iterdir())
    indices = sorted(int(m.group(1)) for m in found if m)
    if not indices:
        raise DataError(f"{directory}: empty batch directory "
                        f"(expected sub-files {directory.name}.0, .1, ...)")
    for expected in range(indices[-1] + 1):
        if expected not in indices:
            raise DataError(f"{directory / f'{directory.name}.{expected}'}: sub-file missing "
                            f"(found {format_ranges(indices)})")
    return [directory / f"{directory.name}.{i}" for i in indices]


def read_batch(data_path, n):
    """The dict of batch `n`. Sub-batch directories are concatenated: list values are joined in
    sub-file order, other values come from the first sub-file. A list of 'data' (JPEG strings,
    which Python 2 pickles hold as str) comes back as a list of bytes."""
    path = batch_path(data_path, n)
    if path.is_dir():
        parts = [_load_dict(sub) for sub in sub_batch_files(path)]
        batch = dict(parts[0])
        for key, value in batch.items():
            if isinstance(value, list):
                batch[key] = [item for part in parts for item in part.get(key, [])]
    elif path.is_file():
        batch = _load_dict(path)
    else:
        _raise_missing(data_path, n)
    data = batch.get("data")
    if isinstance(data, list) and not data or isinstance(data, np.ndarray) and not data.size:
        raise DataError(f"{path}: the batch has no cases ('data' is empty)")
    if isinstance(data, list):
        batch["data"] = [safepickle.as_bytes(item) for item in data]
    return batch


# ---------------------------------------------------------------------------------------------
# Writing (used by the data/ tools): temp file + fsync + rename, so a killed writer never
# leaves a half-written batch under the real name.


def write_meta(data_path, meta):
    Path(data_path).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(data_path) / META_NAME, safepickle.dumps(meta))


def write_batch(data_path, n, batch, sub_batch_size=None):
    """Write batch `n` as one file, or with `sub_batch_size` as a directory of sub-files in which
    every list value is cut into chunks of that many items (make-data.py's layout, §10.1)."""
    Path(data_path).mkdir(parents=True, exist_ok=True)
    target = batch_path(data_path, n)
    if sub_batch_size is None:
        if target.is_dir():
            shutil.rmtree(target)
        atomic_write(target, safepickle.dumps(batch))
        return target
    num_items = max((len(v) for v in batch.values() if isinstance(v, list)), default=0)
    staging = temp_sibling(target)
    staging.mkdir()
    try:
        for i, start in enumerate(range(0, max(num_items, 1), sub_batch_size)):
            part = {k: v[start:start + sub_batch_size] if isinstance(v, list) else v
                    for k, v in batch.items()}
            atomic_write(staging / f"{target.name}.{i}", safepickle.dumps(part))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# What every provider shares


@runtime_checkable
class Provider(Protocol):
    """What the run asks of a data provider (providers/__init__.py builds one by name).

    Built with (data_path or dims, batch_range, init_epoch, init_batchnum, test, options, rank,
    world_size), it walks its batch range in ccn2's order from (init_epoch, init_batchnum) and
    keeps only `rank`'s cases of each batch (parallel/sharding.py)."""

    batch_meta: dict
    cursor: tuple                     # (epoch, batchnum) of the batch get_next_batch returns

    def get_next_batch(self) -> DataBatch: ...

    def get_data_dims(self, idx=0) -> int: ...

    def get_num_classes(self) -> int: ...

    def num_cases(self, batchnum) -> int: ...     # the whole batch's, over all ranks

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state) -> None: ...

    def take_warnings(self) -> list: ...         # what it handled on its own, since last asked

    def close(self) -> None: ...


class CursorProvider:
    """A provider whose state is its cursor: every draw comes from (seed, epoch, batchnum)."""

    def __init__(self, batch_range, init_epoch, init_batchnum):
        self._cursor = BatchCursor(batch_range, init_epoch, init_batchnum)

    @property
    def cursor(self):
        return self._cursor.position

    def state_dict(self):
        return self._cursor.state_dict()

    def load_state_dict(self, state):
        self._cursor.load_state_dict(state)

    def take_warnings(self):
        return []

    def close(self):
        pass


class BatchCursor:
    """The (epoch, batchnum) of the next batch, advanced in ccn2's order (spec §2): the range as
    given, then epoch + 1. As in ccn2's DataProvider, a start batch outside the range means the
    range's first batch (this is also what a resume with a changed range gets)."""

    def __init__(self, batch_range, init_epoch=1, init_batchnum=None):
        self.batch_range = list(batch_range)
        if not self.batch_range:
            raise DataError("empty batch range")
        self.epoch, self.index = init_epoch, 0
        self._seek(init_epoch, init_batchnum)

    def _seek(self, epoch, batchnum):
        self.epoch = int(epoch)
        self.index = self.batch_range.index(batchnum) if batchnum in self.batch_range else 0

    @property
    def position(self):
        return self.epoch, self.batch_range[self.index]

    def advance(self):
        """Return the current (epoch, batchnum) and move to the next one."""
        current = self.position
        self.index = (self.index + 1) % len(self.batch_range)
        if self.index == 0:
            self.epoch += 1
        return current

    def state_dict(self):
        epoch, batchnum = self.position
        return {"epoch": epoch, "batchnum": batchnum}

    def load_state_dict(self, state):
        self._seek(state["epoch"], state["batchnum"])


def batch_generator(seed, epoch, batchnum):
    """A CPU torch.Generator owned by one (seed, epoch, batchnum): the same batch gets the same
    crops and flips on every run and after any resume, whatever was drawn before it."""
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, int(batchnum) % 2**64]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator
