"""Pickles are data, never code: Python 2 batch files load, a malicious pickle is refused."""

import os
import pickle

import numpy as np
import pytest

from distconvnet import safepickle
from distconvnet.errors import DataError


def py2_batch_bytes():
    """A protocol-2 pickle as Python 2's cPickle wrote it: str data as BINSTRING opcodes."""
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2   # > 255 bytes: BINSTRING, not SHORT_
    body = (b"\x80\x02}q\x00(U\x04dataq\x01]q\x02T" + len(jpeg).to_bytes(4, "little") + jpeg +
            b"aU\x06labelsq\x03]q\x04]q\x05K\x07aau.")
    return body, jpeg


def test_python2_binstring_batch_loads():
    data, jpeg = py2_batch_bytes()
    batch = safepickle.loads(data)
    assert batch["labels"] == [[7]]
    assert safepickle.as_bytes(batch["data"][0]) == jpeg


def test_numpy_arrays_from_protocol_2_and_5():
    meta = {"data_mean": np.arange(12, dtype=np.float32).reshape(12, 1), "label_names": ["a"]}
    for protocol in (2, 5):
        out = safepickle.loads(pickle.dumps(meta, protocol=protocol))
        np.testing.assert_array_equal(out["data_mean"], meta["data_mean"])
        assert out["data_mean"].dtype == np.float32


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_reduce_payload_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": [RunsCode()]}, protocol=2))
    with pytest.raises(safepickle.UnsafePickleError, match=rf"{path}: refusing to load .*system"):
        safepickle.load(str(path))
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({"a": list(range(100))})[:40])
    with pytest.raises(DataError, match=rf"{path}: not a readable pickle"):
        safepickle.load(str(path))
    with pytest.raises(DataError, match="cannot read"):
        safepickle.load(str(tmp_path / "missing"))
