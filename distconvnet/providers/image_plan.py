"""What each case of an image data batch shows (spec §10.3), decided on the host before DALI
decodes anything: JPEG header checks, the per-batch draws, bad-image replacement, the crop
origins and mirror flags of every view, colour-noise offsets and labels. numpy only: no DALI.

Every random choice is a function of (seed, epoch, batchnum), so a resumed run sees exactly the
crops, flips, noise and label picks of an uninterrupted one. For the N cases of a batch, before
sharding and in every mode, `batches.batch_generator(seed, epoch, batchnum)` gives in this order
(all torch float64), with W x H the image's own size from its JPEG header:
    crop  = rand(N, 2)    origin x = floor(crop[:, 0] * (W - inner + 1)), y likewise with H
    flip  = rand(N) < 0.5
    alpha = randn(N, 3)   colour noise: c * eigvecs @ (alpha * stdevs) added per channel
    pick  = rand(N)       label = labels[floor(pick * len(labels))] for a multi-label image
"""

from dataclasses import dataclass

import numpy as np
import torch

from .. import safepickle
from ..errors import DataError, brief
from ..parallel.sharding import shard_indices
from .batches import sub_batch_files, batch_generator, batch_path, read_batch

NUM_COLORS = 3
NUM_VIEWS = 10            # 5 crops x {plain, mirrored} (spec §10.3; cifar has 9, §15 item 15)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data):
    """(height, width) from a JPEG's frame header; ValueError says what is wrong with it."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    # Entropy-coded data cannot hold FF D9 (an FF there is always stuffed), so a file whose
    # tail lacks the end-of-image marker was cut short.
    if data.find(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in _SOF_MARKERS or marker == 0xDA:          # the frame, or the scan without one
            height, width = (int.from_bytes(data[pos + i:pos + i + 2], "big") for i in (5, 7))
            if marker == 0xDA or not (height and width):
                break
            return height, width
        pos += 1 if marker == 0xFF else 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    raise ValueError("corrupt JPEG (no usable frame header)")


def locate(path, index):
    """'<sub-file>: image <j>' for image `index` of a batch. Error path only: it re-reads the
    sub-files to count their images."""
    for sub in sub_batch_files(path) if path.is_dir() else []:
        count = len(safepickle.load(sub).get("data", []))
        if index < count:
            return f"{sub}: image {index}"
        index -= count
    return f"{path}: image {index}"


@dataclass
class HostBatch:
    """One data batch as read from disk, with its draws and what is known of its images."""
    path: object
    jpegs: list
    labels: list            # per image: a list of label indices (label_offset applied)
    draws: dict
    sizes: list             # per image: (H, W), or the reason it cannot be used


@dataclass
class Plan:
    """This rank's cases of a host batch: DALI's per-case inputs (the JPEGs themselves go in a
    JpegRuns) and the label values."""
    sources: np.ndarray     # the image each case shows (itself, or a bad one's replacement)
    feeds: dict             # external_source name -> (cases, ...) array (see image.image_graph)
    labels: np.ndarray      # (n,) float32; -1 for an image without labels
    hot: tuple              # (rows, cols) of the ones of the one-/multi-hot matrix
    replaced: list          # (case, image shown instead) for each bad image


@dataclass
class CasePlanner:
    """The provider's settings that decide what a case shows."""
    inner: int
    num_classes: int
    label_offset: int = 0
    test: bool = False
    multiview: bool = False
    color_noise: float = 0.0            # training only; 0 = none
    color_pca: tuple = None             # (stdevs (3,), eigvecs (3, 3) as columns)
    scalar_mean: float = -1.0
    skip_bad_images: bool = False
    seed: int = 0
    minibatch: int = 128
    rank: int = 0
    world_size: int = 1
    img_size: int = 0                   # the batch's image size (batches.meta); 0 = unchecked

    def read(self, data_path, epoch, batchnum):
        batch, path = read_batch(data_path, batchnum), batch_path(data_path, batchnum)
        jpegs, labels = batch.get("data"), batch.get("labels")
        if not (isinstance(jpegs, list) and isinstance(labels, list)
                and len(labels) == len(jpegs)):
            raise DataError(f"{path}: expected 'data', a list of JPEG strings, and 'labels', a "
                            f"list of label lists of the same length")
        labels = [self._check_labels(path, i, value) for i, value in enumerate(labels)]
        n, f64 = len(jpegs), torch.float64
        generator = batch_generator(self.seed, epoch, batchnum)
        draws = {"crop": torch.rand((n, 2), generator=generator, dtype=f64).numpy(),
                 "flip": (torch.rand(n, generator=generator, dtype=f64) < 0.5).numpy(),
                 "alpha": torch.randn((n, 3), generator=generator, dtype=f64).numpy(),
                 "pick": torch.rand(n, generator=generator, dtype=f64).numpy()}
        return HostBatch(path, jpegs, labels, draws, [self._image_size(j) for j in jpegs])

    def _check_labels(self, path, index, value):
        try:
            labels = [int(v) + self.label_offset for v in value]
        except (TypeError, ValueError, OverflowError):
            labels = [-1]
        if any(not 0 <= v < self.num_classes for v in labels):
            raise DataError(f"{locate(path, index)}: label {brief(value)} is not a class index in "
                            f"0..{self.num_classes - 1} (label_offset {self.label_offset})")
        return labels

    def _image_size(self, jpeg):
        try:
            height, width = jpeg_size(jpeg)
        except ValueError as e:
            return str(e)
        # The original asserted this of every image: make_batches.py writes S on the short side.
        if self.img_size and min(height, width) != self.img_size:
            return (f"{width}x{height} image, whose short side is not the batches' image size "
                    f"{self.img_size} (batches.meta)")
        if min(height, width) < self.inner:
            return f"{width}x{height} image is smaller than the {self.inner}² crop"
        return height, width

    def plan(self, host):
        cases = np.arange(len(host.jpegs))
        if self.world_size > 1:
            cases = shard_indices(len(cases), self.minibatch, self.rank, self.world_size)
        sources = np.array([self._source(host, c) for c in cases], dtype=np.int64)
        sizes = np.array([host.sizes[i] for i in sources], np.int64).reshape(-1, 2)
        free = sizes[:, ::-1] - self.inner                             # (W - inner, H - inner)
        feeds = {"channel_offset": self._channel_offsets(host.draws, cases)}
        for v, (origin, mirror) in enumerate(zip(*self._views(host.draws, cases, free))):
            # crop_mirror_normalize takes the origin as a fraction of (size - inner) and rounds
            # its product back, which restores the integer exactly.
            position = (origin / np.maximum(free, 1)).astype(np.float32).T
            feeds[f"crop_x{v}"], feeds[f"crop_y{v}"] = position[0].copy(), position[1].copy()
            feeds[f"mirror{v}"] = mirror.astype(np.int32)
        labels, rows, cols = [], [], []
        for row, (case, index) in enumerate(zip(cases, sources)):
            options = host.labels[index]
            labels.append(float(options[int(host.draws["pick"][case] * len(options))])
                          if options else -1.0)
            rows += [row] * len(options)
            cols += options
        replaced = [(c, i) for c, i in zip(cases, sources) if c != i]
        return Plan(sources, feeds, np.array(labels, np.float32), (rows, cols), replaced)

    def replacement_warnings(self, host, plan):
        """One line per bad image of the plan that another image stands in for."""
        return [f"{locate(host.path, case)}: {host.sizes[case]}; replaced by image {index} of "
                f"the batch" for case, index in plan.replaced]

    def _source(self, host, case):
        """The image case `case` shows: itself, or with skip_bad_images the next good image of
        the batch (wrapping around)."""
        for step in range(len(host.jpegs)):
            index = (case + step) % len(host.jpegs)
            if not isinstance(host.sizes[index], str):
                return index
            if not self.skip_bad_images:
                raise DataError(f"{locate(host.path, index)}: {host.sizes[index]} "
                                f"(--skip-bad-images 1 replaces bad images)")
        raise DataError(f"{host.path}: no usable image in the batch")

    def _views(self, draws, cases, free):
        """Per view, integer (x, y) origins (n, 2) and mirror flags (n,), as in spec §10.3."""
        if not self.test:
            origins = np.floor(draws["crop"][cases] * (free + 1)).astype(np.int64)
            return [origins], [draws["flip"][cases]]
        centre = free // 2
        if not self.multiview:
            return [centre], [np.zeros(len(cases), bool)]
        zero = np.zeros_like(free)
        corners = [zero, np.stack([free[:, 0], zero[:, 1]], 1), centre,
                   np.stack([zero[:, 0], free[:, 1]], 1), free]
        return corners * 2, [np.full(len(cases), flip) for flip in (False, True) for _ in range(5)]

    def _channel_offsets(self, draws, cases):
        """Per case, what crop_mirror_normalize subtracts from each channel: --scalar-mean (when
        >= 0) minus the colour noise c * eigvecs @ (alpha * stdevs) (spec §10.3)."""
        offsets = np.full((len(cases), NUM_COLORS), max(float(self.scalar_mean), 0.0))
        if self.color_noise > 0:
            stdevs, eigvecs = self.color_pca
            offsets -= self.color_noise * (draws["alpha"][cases] * stdevs) @ eigvecs.T
        return offsets.astype(np.float32)


@dataclass
class JpegRuns:
    """The JPEGs of a plan's cases as DALI is fed them, one uint8 matrix per DALI run of up to
    `run_size` cases: a row per case, zero-padded to the run's longest JPEG, and each case's
    length, which the graph cuts the row back to (image.image_graph). One array per run crosses
    into DALI instead of one Python object per image: feeding per image held the training
    process's GIL for about 11 us an image (BENCHMARKS.md)."""
    data: np.ndarray        # uint8, every run's matrix one after the other
    runs: list              # per run: (byte offset in `data`, rows, row width)
    lengths: np.ndarray     # (cases,) int32

    @staticmethod
    def layout(lengths, run_size):
        """(runs, total bytes) for JPEGs of these lengths cut into runs of `run_size` cases."""
        runs, offset = [], 0
        for start in range(0, len(lengths), run_size):
            rows = min(run_size, len(lengths) - start)
            width = max(1, int(lengths[start:start + rows].max()))
            runs.append((offset, rows, width))
            offset += rows * width
        return runs, offset

    @classmethod
    def pack(cls, jpegs, sources, run_size, allocate=lambda size: np.empty(size, np.uint8)):
        """Lay out the JPEGs of `sources` (indices into `jpegs`) in memory from
        allocate(total bytes) (a uint8 array)."""
        lengths = np.array([len(jpegs[i]) for i in sources], np.int32)
        runs, total = cls.layout(lengths, run_size)
        data = allocate(total)
        case = 0
        for offset, rows, width in runs:
            matrix = data[offset:offset + rows * width].reshape(rows, width)
            for row in range(rows):
                jpeg = jpegs[sources[case]]
                matrix[row, :len(jpeg)] = np.frombuffer(jpeg, np.uint8)   # the rest is never read
                case += 1
        return cls(data, runs, lengths)

    def matrix(self, run):
        offset, rows, width = self.runs[run]
        return self.data[offset:offset + rows * width].reshape(rows, width)
