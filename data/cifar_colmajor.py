"""Convert the official CIFAR-10 python tarball into cuda-convnet2's py-colmajor layout (§10.4).

    python data/cifar_colmajor.py --src cifar-10-python.tar.gz --tgt DIR

DIR gets data_batch_1..5 (training), data_batch_6 (the official test_batch) with 'data'
transposed to (3072, 10000) uint8, one column per image, and batches.meta with the mean image of
the five training batches. The tarball's pickles are read through safepickle: nothing in them
can run code.
"""

import argparse
import sys
import tarfile
from pathlib import Path

import numpy as np

from distconvnet import safepickle
from distconvnet.errors import DataError
from distconvnet.providers.batches import write_batch, write_meta

SOURCE_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                  "data_batch_5", "test_batch"]     # written as data_batch_1..6
NUM_TRAINING = 5
NUM_VIS = 3072


def _read_members(src):
    """Basename -> unpickled dict, for the batches and batches.meta in the tarball."""
    wanted = set(SOURCE_BATCHES) | {"batches.meta"}
    found = {}
    try:
        with tarfile.open(src) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in wanted:
                    payload = tar.extractfile(member).read()
                    found[name] = safepickle.loads(payload, source=f"{src}:{member.name}")
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{src}: cannot read the CIFAR-10 tarball ({e})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{src}: missing {', '.join(missing)} (expected the official "
                        f"cifar-10-python.tar.gz)")
    return found


def _colmajor(src, name, batch):
    data = batch.get("data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != NUM_VIS:
        raise DataError(f"{src}:{name}: expected 'data' to be a uint8 array of shape "
                        f"(N, {NUM_VIS})")
    labels = [int(label) for label in batch.get("labels", [])]
    if len(labels) != data.shape[0]:
        raise DataError(f"{src}:{name}: expected {data.shape[0]} 'labels', got {len(labels)}")
    converted = dict(batch, data=np.ascontiguousarray(data.T), labels=labels)
    return converted


def convert(src, tgt):
    """Write the colmajor data set to `tgt`; returns the number of images written."""
    members = _read_members(src)
    batches = [_colmajor(src, name, members[name]) for name in SOURCE_BATCHES]
    training = np.concatenate([b["data"] for b in batches[:NUM_TRAINING]], axis=1)
    data_mean = training.mean(axis=1, dtype=np.float64).astype(np.float32).reshape(NUM_VIS, 1)
    for number, batch in enumerate(batches, start=1):
        write_batch(tgt, number, batch)
    label_names = members["batches.meta"].get("label_names")
    write_meta(tgt, {"data_mean": data_mean, "label_names": list(label_names),
                     "num_vis": NUM_VIS, "num_cases_per_batch": batches[0]["data"].shape[1],
                     "img_size": 32})
    return sum(b["data"].shape[1] for b in batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="cifar-10-python.tar.gz")
    parser.add_argument("--tgt", required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    try:
        count = convert(args.src, args.tgt)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Wrote {count} images as data_batch_1..6 (6 = test) and batches.meta to {args.tgt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
