"""Load cuda-convnet2 pickles (batch files, batches.meta, feature files) without running code,
and without letting a small file cost much memory or time.

Both Python 2 pickles made by the original tools and Python 3 pickles made by ours are read.
Only plain data may come out: dicts with string keys, lists, tuples, strings, bytes, numbers,
numpy scalars and numpy arrays of numeric dtypes built from their own bytes.

A pickle is first read opcode by opcode, building nothing (picklescan.py), and refused if
  * it names a callable other than the few numpy and codec functions plain data needs, or calls
    one of them with anything but what a pickled array, dtype or byte string holds: an object
    or structured dtype, a dtype state other than a plain number's (numpy would read raw bytes
    as pointers), an array shape that needs more bytes than it carries, a text codec other
    than latin-1 (the one linear in time, and the one pickles of bytes use);
  * what it builds would be more than MAX_EXPANSION times the file's size (plus SLACK), counting
    a part it refers to several times (through its memo) once per reference, as whatever walks
    the result will see it; or nests deeper than MAX_DEPTH;
  * it changes a list, dict or array after referring to it again (no pickler writes that: it is
    how a tiny file hides a large or cyclic structure), has dict keys other than strings (a
    pickle of crafted numbers can make a dict take quadratic time), or uses a memo index beyond
    its own size (the unpickler would allocate room for every index below it).
Then the standard unpickler builds the value, with the same callables.
"""

import codecs
import io
import pickle

import numpy as np

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:        # numpy 1
    from numpy.core import multiarray as _multiarray, numeric as _numeric

from .errors import DataError
from .picklescan import CALLABLES, LATIN1, Refused, numeric_dtype_or_none, scan


class UnsafePickleError(DataError):
    pass


# -- building: the standard unpickler with the callables the scan allowed ---------------------

def _numeric_dtype(code, align=False, copy=False):
    if numeric_dtype_or_none(code) is None:
        raise pickle.UnpicklingError(f"refusing dtype {code!r}")
    return np.dtype(code, bool(align), bool(copy))


def _encode(text, encoding="utf-8"):
    if encoding not in LATIN1:
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


_RUNTIME = {"ndarray": np.ndarray, "dtype": _numeric_dtype, "encode": _encode,
            "bytes": _empty_bytes, "_reconstruct": _multiarray._reconstruct,
            "scalar": _multiarray.scalar, "_frombuffer": _numeric._frombuffer}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        what = CALLABLES.get((module, name))
        if what is None:
            raise UnsafePickleError(f"refusing to load {module}.{name}")
        return _RUNTIME[what]


def loads(data, source="<bytes>"):
    """Unpickle `data`; str values from Python 2 come back as latin-1 str (see `as_bytes`)."""
    try:
        scan(data)
    except Refused as e:
        raise UnsafePickleError(f"{source}: {e}") from None
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # numpy's own checks, e.g. non-latin-1 text given as bytes
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
