"""Hostile pickles (issue 22): batch files and batches.meta written byte by byte, as an attacker
would, each end the trainer with one `error:` line naming the file, exit status 1 and no
traceback; reading one costs under 100 MB and a second whatever the file asks for. Batch files
as Python 2's cPickle wrote them (protocols 2 and 0, also written here byte by byte) and
Python 3 protocol-2 pickles holding b'' still train.

Each pickle below is what the issue found breaking the restricted unpickler (or a close
relative): an object-dtype array made from raw bytes (a segmentation fault), a 1 GB bytearray
from a few bytes, a stride-0 array view, shared nested lists, the quadratic punycode codec, a
huge memo index, deep nesting, and dict keys crafted to collide in their hash.
"""

import pickle
import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest

from distconvnet import safepickle
from distconvnet.errors import DataError
from test_train_errors import assert_one_error_line
from trainer_fixtures import batch_ids, run_convnet, run_in_process, tiny_args

# -- opcodes, as Python 2's cPickle wrote them -------------------------------------------------


def proto2(body):
    return b"\x80\x02" + body + b"."


def integer(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])                            # BININT1
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)                  # BININT2
    return b"J" + struct.pack("<i", n)                      # BININT


def py2_str(data):
    """A Python 2 str: SHORT_BINSTRING, or BINSTRING when longer than 255 bytes."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def global_(module, name):
    return b"c" + module + b"\n" + name + b"\n"


def items(*values):
    return b"(" + b"".join(values) + b"t"                   # MARK ... TUPLE


def py2_dict(**entries):
    return b"}(" + b"".join(py2_str(k.encode()) + v for k, v in entries.items()) + b"u"


def py2_list(values):
    return b"](" + b"".join(values) + b"e"


def py2_dtype(code, endian=b"|", flags=0):
    return (global_(b"numpy", b"dtype") + py2_str(code) + integer(0) + integer(1) + b"\x87R"
            + items(integer(3), py2_str(endian), b"NNN", integer(-1), integer(-1),
                    integer(flags)) + b"b")


def py2_array(array):
    """numpy 1.x under Python 2: _reconstruct, then BUILD with (1, shape, dtype, False, str)."""
    endian = b"|" if array.dtype.itemsize == 1 else b"<"
    code = array.dtype.str[1:].encode()
    return (global_(b"numpy.core.multiarray", b"_reconstruct") + global_(b"numpy", b"ndarray")
            + integer(0) + b"\x85" + py2_str(b"b") + b"\x87R"
            + items(integer(1), items(*map(integer, array.shape)), py2_dtype(code, endian),
                    b"\x89", py2_str(array.tobytes())) + b"b")


def protocol0_str(data):
    """Python 2's repr of a str, as protocol 0 writes it: S'...' with \\x escapes."""
    escaped = "".join(chr(b) if 32 <= b < 127 and b not in b"\\'" else f"\\x{b:02x}"
                      for b in data)
    return b"S'" + escaped.encode("ascii") + b"'\n"


def protocol0_array(array):
    """cPickle's default protocol 0: the same calls, with text opcodes and no memo."""
    return (global_(b"numpy.core.multiarray", b"_reconstruct") + b"(" + global_(b"numpy",
            b"ndarray") + b"(I0\ntS'b'\ntR(I1\n(" + b"".join(f"I{n}\n".encode()
            for n in array.shape) + b"t" + global_(b"numpy", b"dtype") + b"(S'"
            + array.dtype.str[1:].encode() + b"'\nI0\nI1\ntR(I3\nS'<'\nNNNI-1\nI-1\nI0\ntbI00\n"
            + protocol0_str(array.tobytes()) + b"tb")


def digits(digit_cifar, number):
    with open(digit_cifar / f"data_batch_{number}", "rb") as f:
        return pickle.load(f)


def py2_batch(batch, **replaced):
    entries = {"data": py2_array(batch["data"]),
               "labels": py2_list([integer(n) for n in batch["labels"]]),
               "batch_label": py2_str(b"digits")}
    return proto2(py2_dict(**{**entries, **replaced}))


def data_with(digit_cifar, tmp_path, name, payload):
    data = tmp_path / "data"
    shutil.copytree(digit_cifar, data)
    (data / name).write_bytes(payload)
    return data


# -- what still loads --------------------------------------------------------------------------

def test_python2_batches_and_protocol2_empty_bytes_train(digit_cifar, tmp_path):
    """Batch 1 and batches.meta as Python 2 wrote them (protocol 2; protocol 0, cPickle's
    default); batch 2 by Python 3 at protocol 2 holding b'' (which it pickles as a call)."""
    with open(digit_cifar / "batches.meta", "rb") as f:
        meta = pickle.load(f)
    files = {"data_batch_1": py2_batch(digits(digit_cifar, 1)),
             "batches.meta": b"(dp0\nS'data_mean'\np1\n" + protocol0_array(meta["data_mean"])
             + b"sS'label_names'\np2\n(lp3\n"
             + b"".join(f"S'{n}'\na".encode() for n in meta["label_names"])
             + b"sS'img_size'\np4\nI10\ns.",
             "data_batch_2": pickle.dumps({**digits(digit_cifar, 2), "note": b""}, protocol=2)}
    for payload in files.values():      # the hand-made bytes say what Python's reader reads
        mine, theirs = safepickle.loads(payload), pickle.loads(payload, encoding="latin1")
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            np.testing.assert_array_equal(mine[key], value)
    data = data_with(digit_cifar, tmp_path, "data_batch_1", files["data_batch_1"])
    (data / "batches.meta").write_bytes(files["batches.meta"])
    (data / "data_batch_2").write_bytes(files["data_batch_2"])
    status, stdout, stderr = run_in_process(tiny_args(data, tmp_path / "save", "--epochs", 1,
                                                      "--train-range", "1-2"))
    assert status == 0, stderr
    assert batch_ids(stdout) == ["1.1", "1.2"]


# -- what is refused ---------------------------------------------------------------------------

def raw_array(count, dtype):
    """An array of `count` 8-byte items of `dtype` (opcodes) whose data are the bytes 0x41:
    for an object dtype, pointers to nowhere."""
    return (global_(b"numpy.core.multiarray", b"_reconstruct") + global_(b"numpy", b"ndarray")
            + integer(0) + b"\x85" + py2_str(b"b") + b"\x87R"
            + items(integer(1), items(integer(count)), dtype, b"\x89",
                    py2_str(b"\x41" * 8 * count)) + b"b")


def object_labels(batch):
    """labels: an 'O' dtype given the state of a plain number (flags 0), then raw bytes."""
    return py2_batch(batch, labels=raw_array(64, py2_dtype(b"O8")))


def object_meta(batch):
    names = py2_list([py2_str(str(n).encode()) for n in range(10)])
    return proto2(py2_dict(label_names=names, img_size=integer(10),
                           data_mean=raw_array(300, py2_dtype(b"O8"))))


def float_dtype_with_object_flags(batch):
    return py2_batch(batch, labels=raw_array(64, py2_dtype(b"f8", b"<", flags=63)))


def gigabyte_bytearray(batch):
    return proto2(global_(b"builtins", b"bytearray") + b"\x8a\x04\x00\x00\x00\x40\x85R")


def stride_0_view(batch):
    """numpy.ndarray((300, 3000000), uint8, buffer=b'\\0', offset=0, strides=(0, 0))."""
    return py2_batch(batch, data=global_(b"numpy", b"ndarray") + items(
        items(integer(300), integer(3_000_000)), py2_dtype(b"u1"), py2_str(b"\x00"), integer(0),
        items(integer(0), integer(0))) + b"R")


def shared_nested_lists(batch):
    """labels: [L2] * 64 where L2 = [L1] * 64, L1 = [L0] * 64, L0 = [0] * 64: each level
    refers to the one below 64 times through the memo (16.7 million numbers, 451 bytes)."""
    levels = b"]q\x00(" + integer(0) * 64 + b"e0"
    for level in range(1, 4):
        levels += b"]q" + bytes([level]) + b"(" + (b"h" + bytes([level - 1])) * 64 + b"e0"
    return py2_batch(batch, labels=levels + b"h\x03")


def punycode(batch):
    text = "".join(chr(0x100 + (i * 7919) % 5000) for i in range(1500)).encode("utf-8")
    return proto2(py2_dict(label_names=global_(b"_codecs", b"encode") + b"X"
                           + struct.pack("<I", len(text)) + text + py2_str(b"punycode")
                           + b"\x86R"))


def memo_index_bomb(batch):
    return proto2(b"}r\xff\xff\xff\x03")


def deep_nesting(batch):
    return proto2(py2_dict(label_names=b"]" * 10_000 + b"a" * 9_999))


def colliding_keys(batch):
    """8000 int keys of one hash (multiples of 2^61 - 1): a dict that takes quadratic time."""
    keys = b"".join(b"\x8a\x0a" + (k * (2**61 - 1)).to_bytes(10, "little") + b"N"
                    for k in range(1, 8001))
    return proto2(py2_dict(label_names=py2_list([py2_str(b"zero")]),
                           extra=b"}(" + keys + b"u"))


# name: (file it replaces, pickle builder, what the error says after the file's name, how:
# "real" runs `python convnet.py` (the file crashed the process on the old code))
HOSTILE = {
    "object-dtype-labels": ("data_batch_1", object_labels,
                            "refusing a numpy array of dtype 'O8'", "real"),
    "object-dtype-meta": ("batches.meta", object_meta,
                          "refusing a numpy array of dtype 'O8'", "real"),
    "object-flags-on-a-float-dtype": ("data_batch_1", float_dtype_with_object_flags,
                                      "sets a numpy dtype's state to", ""),
    "gigabyte-bytearray": ("batches.meta", gigabyte_bytearray,
                           "refusing to load builtins.bytearray", ""),
    "stride-0-array": ("data_batch_1", stride_0_view, "calls numpy.ndarray directly", ""),
    "shared-nested-lists": ("data_batch_1", shared_nested_lists, "would expand to more than", ""),
    "punycode": ("batches.meta", punycode, "encodes text with the codec 'punycode'", ""),
    "memo-index-bomb": ("batches.meta", memo_index_bomb, "uses memo index 67,108,863", ""),
    "deep-nesting": ("batches.meta", deep_nesting, "nests deeper than 32 levels", ""),
    "colliding-dict-keys": ("batches.meta", colliding_keys, "has a dict key that is not a", ""),
}


@pytest.mark.parametrize("name, build, fragment, real", [
    pytest.param(name, build, fragment, how == "real", id=case)
    for case, (name, build, fragment, how) in HOSTILE.items()])
def test_a_hostile_pickle_is_one_line_and_costs_little(digit_cifar, tmp_path, name, build,
                                                       fragment, real):
    payload = build(digits(digit_cifar, 1))
    data = data_with(digit_cifar, tmp_path, name, payload)
    argv = tiny_args(data, tmp_path / "save", "--epochs", 1)
    result = run_convnet(argv) if real else run_in_process(argv)
    assert_one_error_line(*result, f"{data / name}: {fragment}")
    assert not (tmp_path / "save").exists()
    started = time.process_time()       # this process's CPU time: others' load is not ours
    with pytest.raises(DataError):
        safepickle.load(data / name)
    seconds = time.process_time() - started
    tracemalloc.start()
    with pytest.raises(DataError):
        safepickle.load(data / name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6 and seconds < 1.0, (len(payload), peak, seconds)
