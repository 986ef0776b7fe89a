"""A dry run of the unpickler over a pickle's opcodes, building nothing: what safepickle checks
before it lets the standard unpickler build anything (its module text says what is refused).

The scan keeps numbers and short strings as themselves, and for everything else a `Value`:
its kind, its size as data (shared parts counted once per reference), its depth. It runs in
time linear in the file, long strings are measured and skipped rather than decoded.
"""

import io
import math
import pickletools
import re
import struct

import numpy as np

from .errors import DataError, brief
from .pickleargs import PUSHES, READERS, Value

MAX_EXPANSION = 16          # bytes of data per byte of file (a list of small ints needs 4-8)
SLACK = 1 << 20
MAX_DEPTH = 32

# The callables a data pickle may name (Python 2 and 3, numpy 1 and 2), by what they do.
CALLABLES = {("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype",
             ("_codecs", "encode"): "encode",
             ("__builtin__", "bytes"): "bytes", ("builtins", "bytes"): "bytes"}
for _core in ("numpy.core", "numpy._core"):
    CALLABLES.update({(f"{_core}.multiarray", "_reconstruct"): "_reconstruct",
                      (f"{_core}.multiarray", "scalar"): "scalar",
                      (f"{_core}.numeric", "_frombuffer"): "_frombuffer"})
_NUMERIC_CODE = re.compile(r"[biufc]\d{1,2}")
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)     # subarray, names, fields, sizes, flags
LATIN1 = ("latin1", "latin-1")
_DONE = object()


class Refused(Exception):
    """Why the scan refuses a pickle (the file's name and the byte are added)."""


_CODE = ("global", "pending", "code")      # kinds that are not data: callables, or hold them


def _measure(item):
    """(weight, depth, kind) of a stack item."""
    if type(item) is Value:
        return item.weight, item.depth, item.kind
    if type(item) is tuple:         # of short strings and numbers only (see _Scan.tuple)
        return 8 + sum(_measure(x)[0] for x in item), 1, "tuple"
    if isinstance(item, (str, bytes)):
        return 8 + len(item), 0, "str"
    return 8 + (item.bit_length() >> 3 if type(item) is int else 0), 0, "number"


def _length_of_raw(x):
    """The bytes an array's or scalar's data holds (Python 2's str: latin-1, one per byte)."""
    if isinstance(x, (str, bytes)):
        return len(x)
    if type(x) is Value and x.kind in ("str", "bytes", "bytearray"):
        return x.length
    raise Refused("gives an array data that is not a byte string")


class _Scan:
    """A dry run of the unpickler's stack machine (see the module's text)."""

    def __init__(self, size):
        self.budget = MAX_EXPANSION * size + SLACK
        self.max_memo = size
        self.stack, self.marks, self.memo = [], [], {}
        self.handlers = {}
        for op in pickletools.opcodes:
            reader = READERS.get(op.name, op.arg.reader if op.arg else None)
            handler = None if op.name in PUSHES else \
                getattr(self, "op_" + op.name, self._refuse_opcode(op.name))
            self.handlers[op.code.encode("latin-1")] = reader, handler

    def run(self, data):
        f = io.BytesIO(data)
        read, tell, push, handlers = f.read, f.tell, self.stack.append, self.handlers
        pos = 0
        try:
            while True:
                pos = tell()
                reader, handler = handlers[read(1)]
                arg = reader(f) if reader is not None else None
                if handler is None:
                    push(arg)
                elif handler(arg) is _DONE:
                    return
        except Refused as e:
            raise Refused(f"{e} (at byte {pos})") from None
        except (ValueError, IndexError, KeyError, struct.error, EOFError):
            raise DataError(f"not a readable pickle (truncated or damaged at byte {pos})") \
                from None

    @staticmethod
    def _refuse_opcode(name):
        def refuse(arg):
            raise Refused(f"uses the pickle opcode {name}, which plain data never needs")
        return refuse

    # -- building blocks -------------------------------------------------------------------
    def pop_mark(self):
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def pop(self, n):
        """The top `n` items, which must lie above the last mark (as the unpickler checks)."""
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < n:
            raise IndexError("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise IndexError("stack underflow")
        return self.stack[-1]

    def fill(self, container, items, keyed=False):
        """Add `items` (key, value, key, ... if `keyed`) to `container`, checking the bounds."""
        weight, depth = container.weight, container.depth
        for i, item in enumerate(items):
            w, d, kind = _measure(item)
            if kind in _CODE:
                if container.kind != "tuple":
                    raise Refused("stores a callable or an unfinished array as data")
                container.kind = "code"
            if keyed and not i % 2 and kind not in ("str", "bytes"):
                raise Refused("has a dict key that is not a string")
            weight += w
            depth = max(depth, d + 1)
        container.weight, container.depth = weight, depth
        if weight > self.budget:
            raise Refused(f"would expand to more than {self.budget:,} bytes of data "
                          f"({MAX_EXPANSION} times its size), counting each reference to a "
                          f"shared part")
        if depth > MAX_DEPTH:
            raise Refused(f"nests deeper than {MAX_DEPTH} levels")
        return container

    def target(self, kinds):
        value = self.top()
        if type(value) is not Value or value.kind not in kinds:
            raise Refused(f"adds to something that is not a {' or '.join(kinds)}")
        if value.shared:
            raise Refused("changes an object after referring to it again")
        return value

    def tuple(self, items):
        """A tuple of numbers and short strings is kept as itself (shapes, dtype states)."""
        if all(type(x) is not Value and type(x) is not tuple for x in items):
            self.fill(Value("tuple"), items)
            self.stack.append(tuple(items))
        else:
            self.stack.append(self.fill(Value("tuple", items=items), items))

    # -- opcodes ---------------------------------------------------------------------------
    def op_PROTO(self, arg):
        pass

    op_FRAME = op_PROTO

    def op_STOP(self, arg):
        if _measure(self.pop(1)[0])[2] in _CODE:
            raise Refused("holds a callable or an unfinished array, not data")
        return _DONE

    def op_MARK(self, arg):
        self.marks.append(len(self.stack))

    def op_POP(self, arg):
        self.pop(1)

    def op_POP_MARK(self, arg):
        self.pop_mark()

    def op_LIST(self, arg):
        value = self.fill(Value("list"), self.pop_mark())
        self.stack.append(value)

    def op_DICT(self, arg):
        value = self.fill(Value("dict"), self.pop_mark(), keyed=True)
        self.stack.append(value)

    def op_TUPLE(self, arg):
        self.tuple(self.pop_mark())

    def op_TUPLE1(self, arg):
        self.tuple(self.pop(1))

    def op_TUPLE2(self, arg):
        self.tuple(self.pop(2))

    def op_TUPLE3(self, arg):
        self.tuple(self.pop(3))

    def op_APPEND(self, arg):
        items = self.pop(1)
        self.fill(self.target(("list",)), items)

    def op_APPENDS(self, arg):
        items = self.pop_mark()
        self.fill(self.target(("list",)), items)

    def op_SETITEM(self, arg):
        items = self.pop(2)
        self.fill(self.target(("dict",)), items, keyed=True)

    def op_SETITEMS(self, arg):
        items = self.pop_mark()
        self.fill(self.target(("dict",)), items, keyed=True)

    def op_GET(self, arg):
        value = self.memo[arg]
        if type(value) is Value:
            value.shared = True
        self.stack.append(value)

    op_BINGET = op_LONG_BINGET = op_GET

    def op_PUT(self, arg):
        if not 0 <= arg <= self.max_memo:
            raise Refused(f"uses memo index {arg:,}, beyond its size")
        self.memo[arg] = self.top()

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, arg):
        self.op_PUT(len(self.memo))

    def op_GLOBAL(self, arg):
        self.push_callable(*arg.split(" ", 1))

    def op_STACK_GLOBAL(self, arg):
        module, name = self.pop(2)
        if not isinstance(module, str) or not isinstance(name, str):
            raise Refused("names a callable by something that is not a short string")
        self.push_callable(module, name)

    def push_callable(self, module, name):
        what = CALLABLES.get((module, name))
        if what is None:
            raise Refused(f"refusing to load {module}.{name} (only plain data and numpy "
                          f"arrays are allowed)")
        self.stack.append(Value("global", callable=what))

    def op_REDUCE(self, arg):
        func, args = self.pop(2)
        if type(func) is not Value or func.kind != "global":
            raise Refused("calls something that is not an allowed callable")
        items = list(args) if type(args) is tuple else \
            args.items if type(args) is Value and args.items is not None else None
        if items is None:
            raise Refused(f"calls {func.callable} with arguments that are not a tuple")
        call = getattr(self, "call_" + func.callable, None)
        if call is None:
            raise Refused(f"calls numpy.{func.callable} directly")
        self.stack.append(call(items))

    def call_dtype(self, items):
        code, flags = (items[0], items[1:]) if items else (None, ())
        dtype = numeric_dtype_or_none(code)
        if dtype is None or len(flags) > 2 or any(flag not in (0, 1) for flag in flags):
            raise Refused(f"refusing a numpy array of dtype {brief(code)} (only numeric "
                          f"dtypes are allowed)")
        return Value("dtype", dtype=dtype)

    def call_encode(self, items):
        text = items[0] if len(items) == 2 and items[1] in LATIN1 else None
        if isinstance(text, str):
            try:
                return text.encode("latin1")
            except UnicodeEncodeError:
                raise Refused("encodes text that is not latin-1 as bytes") from None
        if type(text) is not Value or text.kind != "str":
            codec = brief(items[1]) if len(items) == 2 else "its default"
            raise Refused(f"encodes text with the codec {codec} (only latin-1, how pickles "
                          f"hold bytes, is allowed)")
        return Value("bytes", weight=text.weight, length=text.length)

    def call_bytes(self, items):
        if items:
            raise Refused("calls bytes() with arguments (only b'' is pickled that way)")
        return b""

    def call__reconstruct(self, items):
        """numpy's pickles make an empty array, (0,) of b'b', that BUILD then fills: any other
        shape would be allocated here, before BUILD."""
        if len(items) != 3 or getattr(items[0], "callable", None) != "ndarray" or \
                items[1] != (0,) or items[2] not in ("b", b"b"):
            raise Refused("calls _reconstruct with arguments other than (ndarray, (0,), 'b')")
        return Value("pending")

    def call_scalar(self, items):
        dtype = items[0].dtype if len(items) == 2 and type(items[0]) is Value else None
        if dtype is None or _length_of_raw(items[1]) != dtype.itemsize:
            raise Refused("makes a numpy scalar without a numeric dtype and its bytes")
        return Value("scalar", weight=8 + dtype.itemsize)

    def call__frombuffer(self, items):
        if len(items) != 4 or items[3] not in ("C", "F"):
            raise Refused("calls _frombuffer with unexpected arguments")
        return _array(items[2], items[1], items[0])

    def op_BUILD(self, arg):
        (state,) = self.pop(1)
        value = self.target(("dtype", "pending"))
        value.shared = True             # a second BUILD would change it after its use
        if value.kind == "dtype":
            plain = type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4) \
                and state[1] in ("<", ">", "|", "=") and state[2:8] == _PLAIN_DTYPE_STATE \
                and state[8:] in ((), (None,))
            if not plain:
                raise Refused(f"sets a numpy dtype's state to {brief(state)} (only a plain "
                              f"number's state is allowed)")
            return
        items = state.items if type(state) is Value and state.items is not None else ()
        if len(items) not in (4, 5) or items[-2] not in (0, 1):
            raise Refused("sets an array's state to something other than (shape, dtype, "
                          "order, data)")
        built = _array(items[-4], items[-3], items[-1])
        value.kind, value.weight = "array", built.weight


def _array(shape, dtype, raw):
    """The scan's value of an array of `shape` and `dtype` (a scanned dtype) made of `raw`."""
    if type(dtype) is not Value or dtype.dtype is None:
        raise Refused("makes an array without a numeric dtype")
    if type(shape) is not tuple or len(shape) > MAX_DEPTH or \
            not all(type(n) is int and n >= 0 for n in shape):
        raise Refused(f"gives an array the shape {brief(shape)}")
    needed = math.prod(shape) * dtype.dtype.itemsize
    if needed != _length_of_raw(raw):
        raise Refused(f"makes a {dtype.dtype} array of shape {shape}, which needs "
                      f"{needed:,} bytes, from {_length_of_raw(raw):,} bytes")
    return Value("array", weight=8 + needed)


def numeric_dtype_or_none(code):
    if not isinstance(code, str) or not _NUMERIC_CODE.fullmatch(code):
        return None
    try:
        dtype = np.dtype(code)
    except TypeError:
        return None
    return dtype if dtype.kind in "biufc" else None


def scan(data):
    """Raise Refused (why, and at which byte) or DataError (not a pickle, or cut short)."""
    _Scan(len(data)).run(data)
