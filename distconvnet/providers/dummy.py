"""Dummy providers for gradient checks and tests (spec §3.5, §10.5): `dummy-lr-<n>` and
`dummy-labeled-<n>`.

n-dimensional data uniform in [0, 1) and labels in 0..9, 7 cases, generated once from the seed
on the provider's device and returned unchanged for every batch. ccn2's versions ignored the
batch range and counted batch 1 only; ours walk the range they are given (default [1]), so the
trainer's progress arithmetic (spec §2) stays true, while the data stay the same every batch.
"""

import math

import torch

from ..parallel.sharding import shard_indices
from .batches import CursorProvider, DataBatch, ProviderOptions

NUM_CLASSES = 10
NUM_CASES = 7


class LabeledDummyDataProvider(CursorProvider):
    description = "Labeled dummy data provider"

    def __init__(self, data_dim, batch_range=None, *, init_epoch=1, init_batchnum=None,
                 test=False, options=ProviderOptions(), rank=0, world_size=1,
                 num_cases=NUM_CASES):
        self.data_dim = int(data_dim)
        self.batch_range = list(batch_range) if batch_range else [1]
        self.test, self.options = test, options
        self.label_names = [str(i) for i in range(NUM_CLASSES)]
        self.batch_meta = {"num_vis": self.data_dim, "label_names": self.label_names,
                           "data_in_rows": True}
        super().__init__(self.batch_range, init_epoch, init_batchnum)
        self._num_cases = num_cases
        device = torch.device(options.device)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(options.seed) % 2**63)
        data = torch.rand(num_cases, self.data_dim, generator=generator, device=device)
        labels = torch.randint(0, NUM_CLASSES, (num_cases,), generator=generator, device=device)
        if world_size > 1:
            keep = torch.from_numpy(shard_indices(num_cases, options.minibatch, rank,
                                                  world_size)).to(device)
            data, labels = data[keep], labels[keep]
        self._mats = [self._as_images(data), labels.float()]

    def _as_images(self, data):
        """(N, 3, S, S) when n = 3*S^2, else flat (N, n); the data layer accepts either."""
        side = math.isqrt(self.data_dim // 3)
        if 3 * side * side == self.data_dim:
            return data.view(-1, 3, side, side)
        return data

    def get_next_batch(self):
        epoch, batchnum = self._cursor.advance()
        return DataBatch(epoch, batchnum, list(self._mats), 1)

    def get_data_dims(self, idx=0):
        return [self.data_dim, 1][idx]

    def get_num_classes(self):
        return NUM_CLASSES

    def num_cases(self, batchnum):
        return self._num_cases


class DummyConvNetLogRegDataProvider(LabeledDummyDataProvider):
    """`dummy-lr-<n>`: the provider ccn2's --check-grads examples use (spec §10.5)."""

    description = "Dummy ConvNet logistic regression"
