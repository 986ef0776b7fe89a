"""Load cuda-convnet2 pickles (batch files, batches.meta, feature files) without running code.

Both Python 2 pickles made by the original tools and Python 3 pickles made by ours are read.
Only plain data may come out: containers, strings, bytes, numbers and numpy arrays. A pickle
that names any other callable (e.g. `os.system` through `__reduce__`) is refused before anything
is called.
"""

import importlib
import io
import pickle

from .errors import DataError

# (module, name) pairs a data pickle may legitimately reference.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "slice"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "complex"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),    # how Python 3 pickles bytes at protocol 2
}


class UnsafePickleError(DataError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"refusing to load {module}.{name} (only plain data and "
                                    f"numpy arrays are allowed)")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if module == "__builtin__":
            module = "builtins"
        return getattr(importlib.import_module(module), name)


def loads(data, source="<bytes>"):
    """Unpickle `data`; str values from Python 2 come back as latin-1 str (see `as_bytes`)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{source}: {e}") from None
    except Exception as e:  # truncated or corrupt: any unpickling failure is a data error
        raise DataError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def load(path):
    """Unpickle the file at `path` safely; a missing or damaged file raises DataError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return loads(data, source=str(path))


def as_bytes(value):
    """A Python 2 `str` of raw bytes (JPEG data) arrives as latin-1 text; turn it back."""
    return value.encode("latin1") if isinstance(value, str) else bytes(value)


def dumps(obj):
    """Our writers use the highest protocol, as cuda-convnet2's did."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
