"""Data providers by `--data-provider` name (spec §3.5) and the one way to build them.

`image` is imported only when asked for, so DALI is never loaded for CIFAR or dummy runs.
"""

import importlib
from collections.abc import Mapping

from ..errors import DataError
from .batches import DataBatch, ProviderOptions
from .cifar import CIFARDataProvider
from .dummy import DummyConvNetLogRegDataProvider, LabeledDummyDataProvider

__all__ = ["PROVIDERS", "DataBatch", "ProviderOptions", "make_provider"]


class _Registry(Mapping):
    """name -> provider class; a value given as "module:Class" is imported on first lookup."""

    def __init__(self, entries):
        self._entries = dict(entries)

    def __getitem__(self, name):
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attribute = entry.split(":")
            entry = getattr(importlib.import_module(module, __name__), attribute)
            self._entries[name] = entry
        return entry

    def __contains__(self, name):
        return name in self._entries          # Mapping's default would import to answer

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


PROVIDERS = _Registry({
    "image": ".image:ImageDataProvider",
    "cifar": CIFARDataProvider,
    "dummy-lr-n": DummyConvNetLogRegDataProvider,
    "dummy-labeled-n": LabeledDummyDataProvider,
})


def _resolve(name):
    """(registry key, dimensionality or None). `dummy-xxx-<n>` is looked up as `dummy-xxx-n`
    with n passed as the dimensionality, as ccn2's DataProvider.get_instance did (spec §3.5)."""
    if name in PROVIDERS and not name.endswith("-n"):
        return name, None
    head, _, number = name.rpartition("-")
    if name.startswith("dummy-") and number.isdigit() and int(number) > 0:
        key = head + "-n"
        if key in PROVIDERS:
            return key, int(number)
    available = ", ".join(sorted(PROVIDERS))
    raise DataError(f"Unable to create data provider: No such data provider: {name} "
                    f"(available: {available})")


def make_provider(name, data_path, batch_range, *, init_epoch=1, init_batchnum=None, test=False,
                  options=ProviderOptions(), rank=0, world_size=1):
    key, dims = _resolve(name)
    kwargs = dict(init_epoch=init_epoch, init_batchnum=init_batchnum, test=test,
                  options=options, rank=rank, world_size=world_size)
    if dims is not None:
        return PROVIDERS[key](dims, batch_range, **kwargs)
    return PROVIDERS[key](data_path, batch_range, **kwargs)
