"""The opcode arguments of a pickle, as picklescan.py's dry run reads them: numbers and strings
up to SHORT characters as themselves, longer strings measured (or skipped), not decoded.
"""

import codecs
import io
import pickletools
import struct

import numpy as np

SHORT = 64                 # strings up to this long are kept as themselves by the scan


class Value:
    """What the scan knows of an object that it does not keep as itself: its kind, its size as
    data (`weight`, in bytes, shared parts once per reference), its depth, and for strings their
    length, for tuples their items, for dtypes the dtype, for callables what they do."""

    __slots__ = ("kind", "weight", "depth", "length", "items", "dtype", "callable", "shared")

    def __init__(self, kind, weight=8, length=0, items=None, dtype=None, callable=None):
        self.kind, self.weight, self.depth, self.length = kind, weight, 0, length
        self.items, self.dtype, self.callable, self.shared = items, dtype, callable, False


def _exactly(f, n):
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


def _sized(prefix, kind, signed=False):
    """A reader of a string argument whose length comes first, in `prefix` bytes: short ones
    are read, long ones measured (UTF-8 text by its characters: the bytes that do not
    continue one) or skipped."""
    def read(f):
        n = int.from_bytes(_exactly(f, prefix), "little", signed=signed)
        if n <= SHORT and kind != "bytearray":
            data = _exactly(f, n)
            return data.decode(kind, "surrogatepass") if kind == "utf-8" else \
                data.decode("latin-1") if kind == "latin-1" else data
        if kind == "utf-8":
            # continuation bytes, 0x80-0xBF, are the int8 values -128..-65
            length = int(np.count_nonzero(np.frombuffer(_exactly(f, n), np.int8) > -65))
        elif not 0 <= n <= len(f.getbuffer()) - f.tell():
            raise ValueError("truncated")
        else:
            f.seek(n, io.SEEK_CUR)
            length = n
        return Value("str" if kind in ("utf-8", "latin-1") else kind, weight=8 + n,
                     length=length)
    return read


def _text_reader(reader):
    """Protocol 0's newline-ended strings, kept whole or measured like the others."""
    def read(f):
        text = reader(f)
        return text if len(text) <= SHORT else \
            Value("str", weight=8 + len(text), length=len(text))
    return read


def _unsigned(n):
    return lambda f: int.from_bytes(_exactly(f, n), "little")


READERS = {
    "BININT1": _unsigned(1), "BININT2": _unsigned(2), "BINPUT": _unsigned(1),
    "BINGET": _unsigned(1), "LONG_BINPUT": _unsigned(4), "LONG_BINGET": _unsigned(4),
    "BININT": lambda f: int.from_bytes(_exactly(f, 4), "little", signed=True),
    "BINFLOAT": lambda f: struct.unpack(">d", _exactly(f, 8))[0],
    "NONE": lambda f: None, "NEWTRUE": lambda f: True, "NEWFALSE": lambda f: False,
    "EMPTY_TUPLE": lambda f: (), "EMPTY_LIST": lambda f: Value("list"),
    "EMPTY_DICT": lambda f: Value("dict"),
    "SHORT_BINUNICODE": _sized(1, "utf-8"), "BINUNICODE": _sized(4, "utf-8"),
    "BINUNICODE8": _sized(8, "utf-8"), "SHORT_BINSTRING": _sized(1, "latin-1"),
    "BINSTRING": _sized(4, "latin-1", signed=True), "SHORT_BINBYTES": _sized(1, "bytes"),
    "BINBYTES": _sized(4, "bytes"), "BINBYTES8": _sized(8, "bytes"),
    "BYTEARRAY8": _sized(8, "bytearray"),
    # Python 2's STRING under encoding='latin1' (pickletools' own reader takes it for ASCII)
    "STRING": _text_reader(lambda f: codecs.escape_decode(
        pickletools.read_stringnl(f, decode=False))[0].decode("latin-1")),
    "UNICODE": _text_reader(pickletools.read_unicodestringnl),
}
PUSHES = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
          "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "EMPTY_LIST",
          "EMPTY_DICT", "STRING", "BINSTRING",
          "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
          "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
