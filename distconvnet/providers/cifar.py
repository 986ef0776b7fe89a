"""CIFARDataProvider: cuda-convnet2's `cifar` provider (spec §10.4), as batched tensor ops.

Each batch of the range is read once, on first use, and this rank's cases of it (all of them for
one process) are kept as a uint8 tensor (N, 3, S, S) on the provider's device (a 10000-image
batch is 30 MB). The original read the whole range at construction, which made `shownet
--show-preds` load all training data (spec §15 item 7); loading lazily gives the same steady
state without that cost. Crops and flips are gathers with per-image offsets (as airbench's
GPU-resident loader does), never a Python loop over images; the conversion to float and the
mean subtraction are two passes over the batch, writing on CUDA the channels_last layout that
fastpath.place gives the net, so that the first layer reads it as it is.
"""

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, OptionError
from ..parallel.sharding import shard_indices
from .batches import (META_NAME, CursorProvider, DataBatch, ProviderOptions, batch_generator,
                      batch_path, list_batches, load_meta, meta_int, read_batch,
                      require_batches)

NUM_COLORS = 3
NUM_VIEWS = 9      # the 3x3 grid of crop origins, no flips (spec §10.4; image gives 10, §15.15)


class CIFARDataProvider(CursorProvider):
    description = "CIFAR-10 data provider"

    def __init__(self, data_path, batch_range=None, *, init_epoch=1, init_batchnum=None,
                 test=False, options=ProviderOptions(), rank=0, world_size=1):
        self.data_path = Path(data_path)
        self.batch_meta = load_meta(self.data_path)
        if batch_range is None:
            batch_range = list_batches(self.data_path)
        require_batches(self.data_path, batch_range)
        self.batch_range = list(batch_range)
        self.test, self.options = test, options
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(options.device)
        super().__init__(self.batch_range, init_epoch, init_batchnum)
        self.label_names = self._check_label_names()
        self.img_size = meta_int(self.data_path, self.batch_meta, "img_size", 32, minimum=1)
        self.inner_size = options.inner_size or self.img_size
        if not 0 < self.inner_size <= self.img_size:
            raise OptionError(f"--inner-size {options.inner_size} must lie in 1..{self.img_size} "
                              f"(the image size of {self.data_path})")
        # Integer division, as in the original: an odd margin loses its last row and column.
        self.border = (self.img_size - self.inner_size) // 2
        self.multiview = bool(options.multiview) and test
        self.num_views = NUM_VIEWS if self.multiview else 1
        self.mean_crop = self._centre_mean_crop()
        # fastpath.place makes the net channels_last on CUDA: batches laid out so reach its
        # first layer without a conversion.
        self.memory_format = torch.channels_last if self.device.type == "cuda" else \
            torch.contiguous_format
        self._loaded = {}
        self._cases = {}      # batchnum -> (cases in the whole batch, this rank's rows or None)

    # -- the provider contract (batches.Provider) ----------------------------------------------

    def get_next_batch(self):
        epoch, batchnum = self._cursor.advance()
        images, labels = self._load(batchnum)
        num_cases, rows = self._cases[batchnum]
        if self.multiview:
            crops = self._grid_views(images)
            labels = labels.repeat(NUM_VIEWS)
        elif self.test:
            b = self.border
            crops = images[:, :, b:b + self.inner_size, b:b + self.inner_size]
        else:
            origins, flips = self._draw_augmentation(epoch, batchnum, num_cases)
            if rows is not None:
                origins, flips = origins[rows], flips[rows]
            crops = crop_images(images, origins, flips, self.inner_size)
        # Spec §15 item 7, reproduced on purpose: ccn2 subtracts --scalar-mean even at its
        # default -1 (so the data are shifted by +1) and then also the mean image. Published
        # cifar results and layer-params were tuned on data shifted that way. The uint8 crops
        # become float in the first subtraction itself, which saves a pass over the batch and
        # rounds the same: (float(x) - scalar) - mean.
        data = torch.empty(crops.shape, dtype=torch.float32, device=self.device,
                           memory_format=self.memory_format)
        torch.sub(crops, float(self.options.scalar_mean), out=data)
        data.sub_(self.mean_crop)
        return DataBatch(epoch, batchnum, [data, labels.clone()], self.num_views)

    def get_data_dims(self, idx=0):
        dims = [self.inner_size ** 2 * NUM_COLORS, 1]
        return dims[idx]

    def get_num_classes(self):
        return len(self.label_names)

    def num_cases(self, batchnum):
        """Cases in the whole data batch (before sharding, one view)."""
        self._load(batchnum)
        return self._cases[batchnum][0]

    # -- loading and checking -----------------------------------------------------------------

    def _check_label_names(self):
        names = self.batch_meta.get("label_names")
        if not isinstance(names, (list, tuple)) or not names:
            raise DataError(f"{self.data_path / META_NAME}: expected 'label_names', a non-empty "
                            f"list of class names")
        return [str(name) for name in names]

    def _centre_mean_crop(self):
        size, b, inner = self.img_size, self.border, self.inner_size
        mean = self.batch_meta.get("data_mean")
        expected = NUM_COLORS * size * size
        if not isinstance(mean, np.ndarray) or mean.size != expected:
            got = f"shape {mean.shape}" if isinstance(mean, np.ndarray) else type(mean).__name__
            raise DataError(f"{self.data_path / META_NAME}: expected 'data_mean' with {expected} "
                            f"values (3x{size}x{size} mean image), got {got}")
        # The same centre crop of the mean image is subtracted from every crop (spec §10.3/4).
        mean = mean.astype(np.float32).reshape(NUM_COLORS, size, size)[:, b:b + inner,
                                                                       b:b + inner]
        return torch.from_numpy(np.ascontiguousarray(mean)).to(self.device)

    def _load(self, batchnum):
        """(uint8 images, labels) of this rank's cases of batch `batchnum`, read on first use."""
        if batchnum not in self._loaded:
            batch = read_batch(self.data_path, batchnum)
            path = batch_path(self.data_path, batchnum)
            data = self._check_data(path, batch.get("data"))
            labels = self._check_labels(path, batch.get("labels"), data.shape[1])
            size = self.img_size
            columns = torch.from_numpy(data).to(self.device)
            # Column-major on disk: one column per image (spec §10.4); transpose on the device.
            images = columns.t().contiguous().view(-1, NUM_COLORS, size, size)
            labels = torch.from_numpy(labels).to(self.device)
            num_cases, rows = images.shape[0], None
            if self.world_size > 1:
                rows = torch.from_numpy(shard_indices(num_cases, self.options.minibatch,
                                                      self.rank, self.world_size)).to(self.device)
                images, labels = images[rows], labels[rows]
            self._loaded[batchnum] = images, labels
            self._cases[batchnum] = num_cases, rows
        return self._loaded[batchnum]

    def _check_data(self, path, data):
        rows = NUM_COLORS * self.img_size ** 2
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[0] != rows):
            got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                   else type(data).__name__)
            raise DataError(f"{path}: expected 'data' to be a uint8 array of shape ({rows}, N), "
                            f"got {got}")
        return np.ascontiguousarray(data)

    def _check_labels(self, path, labels, num_cases):
        try:
            values = np.asarray(labels, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            values = None
        if labels is None or values is None or values.size != num_cases:
            raise DataError(f"{path}: expected 'labels', a list of {num_cases} class indices "
                            f"(numbers in 0..{len(self.label_names) - 1})")
        num_classes = len(self.label_names)
        bad = (values != np.floor(values)) | (values < 0) | (values >= num_classes)
        if bad.any():
            raise DataError(f"{path}: label {values[bad][0]:g} is not a class index in "
                            f"0..{num_classes - 1} (batches.meta has {num_classes} label_names)")
        return values.astype(np.float32)

    # -- augmentation -------------------------------------------------------------------------

    def _draw_augmentation(self, epoch, batchnum, num_cases):
        """Per image: crop origin (y, x) uniform in {0..2b}, mirror with probability 1/2. Drawn
        for the whole batch before sharding, so each case's crop is the same at any world size."""
        generator = batch_generator(self.options.seed, epoch, batchnum)
        origins = torch.randint(0, 2 * self.border + 1, (num_cases, 2), generator=generator)
        flips = torch.randint(0, 2, (num_cases,), generator=generator).bool()
        return origins.to(self.device), flips.to(self.device)

    def _grid_views(self, images):
        """The 9 crops with origins {0, b, 2b}^2, view (y_i, x_i) at index 3*y_i + x_i, stacked
        view-major (row N*v + i), as the original's start_positions list."""
        inner, b = self.inner_size, self.border
        views = [images[:, :, y * b:y * b + inner, x * b:x * b + inner]
                 for y in range(3) for x in range(3)]
        return torch.cat(views, dim=0)


def crop_images(images, origins, flips, inner):
    """images (N, C, S, S), origins (N, 2) as (y, x), flips (N,) bool -> (N, C, inner, inner).

    Mirroring is within the crop (the original's pic[:, :, ::-1] after cropping)."""
    steps = torch.arange(inner, device=images.device)
    rows = origins[:, :1] + steps
    cols = origins[:, 1:] + torch.where(flips[:, None], inner - 1 - steps, steps)
    cases = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[cases, channels, rows[:, None, :, None], cols[:, None, None, :]]
