"""Build the embedded demo data set: real handwritten digits in the CIFAR py-colmajor layout.

    python data/make_demo_data.py [--tgt data/demo-cifar]

The images are scikit-learn's bundled digits (1797 real 8x8 grey scans, 10 classes), so nothing
is downloaded. Each is scaled to 0..255, enlarged to 32x32 (bicubic) and repeated in R, G and B,
then the set is shuffled once with a fixed seed (like make-data.py's one shuffle, but seeded) and
cut into data_batch_1..5 (training, 300 each) and data_batch_6 (test, the remaining 297).
Running it again rewrites identical files.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from distconvnet.errors import DataError
from distconvnet.providers.batches import write_batch, write_meta

IMG_SIZE = 32
NUM_VIS = 3 * IMG_SIZE * IMG_SIZE
CASES_PER_BATCH = 300
NUM_TRAINING_BATCHES = 5
SHUFFLE_SEED = 1797
DEFAULT_TGT = Path(__file__).resolve().parent / "demo-cifar"


def digit_columns():
    """(3072, 1797) uint8, one channel-major RGB 32x32 image per column, and the labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits come with scikit-learn, which is not installed: pip "
                        "install scikit-learn (the [test] extra)") from None
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)     # pixel values 0..16
    enlarged = np.stack([np.asarray(Image.fromarray(img).resize((IMG_SIZE, IMG_SIZE),
                                                                Image.BICUBIC))
                         for img in grey])
    rgb = np.repeat(enlarged[:, None], 3, axis=1).reshape(len(grey), NUM_VIS)
    return np.ascontiguousarray(rgb.T), digits.target.astype(int)


def build(tgt):
    """Write the demo set to `tgt`; returns (number of images, cases in the test batch)."""
    columns, labels = digit_columns()
    order = np.random.RandomState(SHUFFLE_SEED).permutation(columns.shape[1])
    columns, labels = columns[:, order], labels[order]
    cuts = [CASES_PER_BATCH * i for i in range(1, NUM_TRAINING_BATCHES + 1)]
    for number, (data, batch_labels, index) in enumerate(
            zip(np.split(columns, cuts, axis=1), np.split(labels, cuts), np.split(order, cuts)),
            start=1):
        write_batch(tgt, number, {
            "data": np.ascontiguousarray(data),
            "labels": [int(label) for label in batch_labels],
            "batch_label": f"sklearn digits, batch {number} of {NUM_TRAINING_BATCHES + 1}",
            "filenames": [f"digit_{i:04d}.png" for i in index],
        })
    training = columns[:, :cuts[-1]]
    write_meta(tgt, {
        "data_mean": training.mean(axis=1, dtype=np.float64).astype(np.float32)
                             .reshape(NUM_VIS, 1),
        "label_names": [str(digit) for digit in range(10)],
        "num_vis": NUM_VIS,
        "num_cases_per_batch": CASES_PER_BATCH,
        "img_size": IMG_SIZE,
    })
    return columns.shape[1], columns.shape[1] - cuts[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tgt", default=str(DEFAULT_TGT),
                        help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        total, num_test = build(args.tgt)
    except (DataError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Wrote {total} digit images to {args.tgt}: data_batch_1..{NUM_TRAINING_BATCHES} "
          f"({CASES_PER_BATCH} each, training), data_batch_6 ({num_test}, test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
