"""Batch files as cuda-convnet2's Python 2 tools wrote them, read without running code."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from distconvnet.errors import DataError
from distconvnet.parallel.sharding import shard_indices
from distconvnet.providers.batches import (BatchCursor, batch_generator, format_ranges,
                                           list_batches, load_meta, read_batch,
                                           require_batches, write_batch, write_meta)

# --- Python 2 protocol-2 pickles, opcode by opcode (as cPickle wrote str and numpy arrays) ---


def py2_str(raw):
    """A Python 2 `str`: SHORT_BINSTRING below 256 bytes, BINSTRING above."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<I", len(raw)) + raw


def py2_int(value):
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def py2_list(items):
    return b"](" + b"".join(items) + b"e"


def py2_dict(pairs):
    return b"}(" + b"".join(py2_str(k) + v for k, v in pairs) + b"u"


def py2_ndarray(array):
    """numpy 1.x under Python 2: _reconstruct(ndarray, (0,), 'b') then BUILD with raw str data."""
    codes = {np.dtype(np.uint8): (b"u1", b"|"), np.dtype(np.float32): (b"f4", b"<")}
    code, order = codes[array.dtype]
    dtype = (b"cnumpy\ndtype\n" + py2_str(code) + b"K\x00K\x01\x87R(K\x03" + py2_str(order)
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(py2_int(d) for d in array.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b")
            + b"\x87R(K\x01" + shape + dtype + b"\x89" + py2_str(array.tobytes()) + b"tb")


def py2_pickle(body):
    return b"\x80\x02" + body + b"."


def fake_jpeg(seed, size):
    """Bytes with the JPEG markers and every high byte value: latin-1 must round-trip them."""
    rng = np.random.default_rng(seed)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size, dtype=np.uint8).tobytes() + b"\xff\xd9"


def jpeg_sub_batch(jpegs, labels):
    return py2_pickle(py2_dict([
        (b"data", py2_list(py2_str(j) for j in jpegs)),
        (b"labels", py2_list(py2_list(py2_int(x) for x in ls) for ls in labels)),
    ]))


# --- reading ---------------------------------------------------------------------------------


def test_single_file_batch_with_numpy_array_from_python2(tmp_path):
    data = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    mean = np.linspace(-1, 1, 3, dtype=np.float32).reshape(3, 1)
    (tmp_path / "data_batch_4").write_bytes(py2_pickle(py2_dict([
        (b"data", py2_ndarray(data)),
        (b"labels", py2_list(py2_int(x) for x in [0, 9, 3, 1])),
        (b"batch_label", py2_str(b"training batch 4 of 5")),
    ])))
    (tmp_path / "batches.meta").write_bytes(py2_pickle(py2_dict([
        (b"data_mean", py2_ndarray(mean)),
        (b"label_names", py2_list(py2_str(n) for n in [b"cat", b"dog", b"caf\xe9"])),
    ])))
    batch = read_batch(tmp_path, 4)
    assert batch["data"].dtype == np.uint8 and np.array_equal(batch["data"], data)
    assert batch["labels"] == [0, 9, 3, 1]
    assert batch["batch_label"] == "training batch 4 of 5"
    meta = load_meta(tmp_path)
    assert meta["data_mean"].dtype == np.float32 and np.array_equal(meta["data_mean"], mean)
    assert meta["label_names"] == ["cat", "dog", "caf\xe9"]


def test_sub_batch_directory_concatenates_in_numeric_order(tmp_path):
    directory = tmp_path / "data_batch_1000"
    directory.mkdir()
    jpegs = [fake_jpeg(i, 300 if i % 2 else 40) for i in range(12)]   # BINSTRING and SHORT_
    for part in range(12):          # .10 and .11 must come after .9, not after .1
        (directory / f"data_batch_1000.{part}").write_bytes(
            jpeg_sub_batch([jpegs[part]], [[part, part + 1] if part == 5 else [part]]))
    batch = read_batch(tmp_path, 1000)
    assert batch["data"] == jpegs
    assert all(isinstance(j, bytes) for j in batch["data"])
    assert batch["labels"][:6] == [[0], [1], [2], [3], [4], [5, 6]]
    assert batch["labels"][-1] == [11]


def test_missing_batch_lists_what_exists(tmp_path):
    for n in (1, 2, 3, 7):
        (tmp_path / f"data_batch_{n}").write_bytes(py2_pickle(py2_dict([])))
    with pytest.raises(DataError, match=r"data batch 9 not found in .* \(available: 1-3, 7\)"):
        read_batch(tmp_path, 9)
    with pytest.raises(DataError, match="data batch 5 not found"):
        require_batches(tmp_path, [1, 2, 5])
    assert list_batches(tmp_path) == [1, 2, 3, 7]


def test_missing_sub_file_is_named(tmp_path):
    directory = tmp_path / "data_batch_2"
    directory.mkdir()
    for part in (0, 2):
        (directory / f"data_batch_2.{part}").write_bytes(jpeg_sub_batch([b"x"], [[0]]))
    with pytest.raises(DataError, match=r"data_batch_2\.1: sub-file missing"):
        read_batch(tmp_path, 2)


def test_empty_batch_directory(tmp_path):
    (tmp_path / "data_batch_0").mkdir()
    with pytest.raises(DataError, match="data_batch_0: empty batch directory"):
        read_batch(tmp_path, 0)


def test_truncated_pickle(tmp_path):
    whole = py2_pickle(py2_dict([(b"data", py2_ndarray(np.zeros((3, 4), np.uint8)))]))
    (tmp_path / "data_batch_1").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="data_batch_1: not a readable pickle"):
        read_batch(tmp_path, 1)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": _Exploit(marker)}, protocol=2))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(_Exploit(marker), protocol=4))
    with pytest.raises(DataError, match="refusing to load"):
        read_batch(tmp_path, 1)
    with pytest.raises(DataError, match="refusing to load"):
        load_meta(tmp_path)
    assert not marker.exists()


def test_missing_meta_and_non_dict(tmp_path):
    with pytest.raises(DataError, match="batches.meta not found"):
        load_meta(tmp_path)
    (tmp_path / "batches.meta").write_bytes(py2_pickle(py2_list([])))
    with pytest.raises(DataError, match="expected a pickled dict, got list"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="data directory does not exist"):
        list_batches(tmp_path / "nowhere")


# --- writing -------------------------------------------------------------------------------


def test_writers_round_trip_and_leave_no_temp_files(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(6, 4)
    write_batch(tmp_path, 1, {"data": data, "labels": [1, 2, 3, 4]})
    write_batch(tmp_path, 1, {"data": data + 1, "labels": [4, 3, 2, 1]})     # rewrite in place
    jpegs = [fake_jpeg(i, 10) for i in range(5)]
    write_batch(tmp_path, 2, {"data": jpegs, "labels": [[i] for i in range(5)]},
                sub_batch_size=2)
    write_meta(tmp_path, {"label_names": ["a", "b"], "num_vis": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2"]
    assert sorted(p.name for p in (tmp_path / "data_batch_2").iterdir()) == [
        "data_batch_2.0", "data_batch_2.1", "data_batch_2.2"]
    assert np.array_equal(read_batch(tmp_path, 1)["data"], data + 1)
    assert read_batch(tmp_path, 2) == {"data": jpegs, "labels": [[i] for i in range(5)]}
    assert load_meta(tmp_path) == {"label_names": ["a", "b"], "num_vis": 6}
    assert (tmp_path / "data_batch_1").read_bytes()[:2] == bytes([0x80, pickle.HIGHEST_PROTOCOL])


# --- cursor, randomness, sharding --------------------------------------------------------------


def test_cursor_follows_the_range_then_wraps_to_the_next_epoch():
    cursor = BatchCursor([3, 1, 2], init_epoch=4, init_batchnum=1)
    assert [cursor.advance() for _ in range(4)] == [(4, 1), (4, 2), (5, 3), (5, 1)]
    assert cursor.position == (5, 2)
    resumed = BatchCursor([3, 1, 2])
    resumed.load_state_dict(cursor.state_dict())
    assert resumed.advance() == (5, 2) and resumed.advance() == (6, 3)
    assert BatchCursor([5, 6], init_epoch=2, init_batchnum=9).position == (2, 5)   # as ccn2


def test_batch_generator_depends_on_seed_epoch_and_batchnum():
    def draw(*key):
        return torch.randint(0, 1000, (8,), generator=batch_generator(*key))
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert not torch.equal(draw(1, 2, 3), draw(*other))


def test_shard_indices_worked_example():
    # slices [0,4) [4,8) [8,10); parts of ceil(4/3)=2 and ceil(2/3)=1 cases
    assert shard_indices(10, 4, 0, 3).tolist() == [0, 1, 4, 5, 8]
    assert shard_indices(10, 4, 1, 3).tolist() == [2, 3, 6, 7, 9]
    assert shard_indices(10, 4, 2, 3).tolist() == []
    assert shard_indices(10, 128, 0, 1).tolist() == list(range(10))


@pytest.mark.parametrize("num_cases,minibatch,world_size", [
    (10000, 128, 2), (10000, 128, 3), (143, 128, 4), (7, 128, 8), (1, 5, 2), (0, 4, 2),
    (3072, 512, 8),
])
def test_shards_are_disjoint_and_cover_every_case(num_cases, minibatch, world_size):
    shards = [shard_indices(num_cases, minibatch, r, world_size) for r in range(world_size)]
    every = np.concatenate(shards)
    assert np.array_equal(np.sort(every), np.arange(num_cases))
    for shard in shards:
        assert np.all(np.diff(shard) > 0)
        # within each minibatch slice, a rank's part is contiguous and at most ceil(M/W) long
        for start in range(0, num_cases, minibatch):
            part = shard[(shard >= start) & (shard < start + minibatch)]
            assert len(part) <= -(-minibatch // world_size)
            assert len(part) == 0 or part[-1] - part[0] == len(part) - 1


def test_format_ranges():
    assert format_ranges([0, 1, 2, 1000, 1001, 5]) == "0-2, 5, 1000-1001"
    assert format_ranges([]) == "none"
