"""Make cuda-convnet2 ImageNet batches (spec §10.1) from the ILSVRC-2012 tars or a folder tree.

    python data/make_batches.py --src-dir SRC --tgt-dir TGT [--batch-size 3072]
        [--sub-batch-size 1024] [--image-size 256] [--jobs N] [--seed S]

SRC holds either the three ILSVRC-2012 files (ILSVRC2012_img_train.tar, a tar of per-synset
tars; ILSVRC2012_img_val.tar; ILSVRC2012_devkit_t12.tar.gz with data/meta.mat and the validation
ground truth) or a tree train/<class>/*, val/<class>/* whose sorted class folder names are the
label names. Every image is decoded with PIL, converted to RGB, scaled so its short side is
--image-size, centre-cropped to a square and re-encoded as baseline JPEG quality 95. Unreadable
files are named on stderr and skipped. TGT gets data_batch_0.. (training, shuffled once with
--seed), the validation batches from the next multiple of 1000 (sorted by file name), each a
directory of sub-batch pickles, and batches.meta with the training set's mean image and the
colour PCA of its pixels. The console output follows make-data.py's (spec §9.3).
"""

import argparse
import io
import math
import multiprocessing
import os
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from distconvnet.errors import DataError
from distconvnet.providers.batches import write_batch, write_meta

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT, VAL_TRUTH = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
NUM_ILSVRC_CLASSES = 1000
JPEG_QUALITY = 95
IMAGES_PER_TASK = 128     # a worker's unit: small enough to balance, large enough to amortise
VALIDATION_ALIGN = 1000   # validation batches start at the next multiple of this (spec §10.1)


# ---------------------------------------------------------------------------------------------
# One image: what the workers run


def resize_to_square(data, image_size):
    """JPEG bytes of the central image_size² square of the image in `data`, scaled so its short
    side is image_size, and the same pixels as an (S, S, 3) uint8 array. Raises on bad data."""
    with Image.open(io.BytesIO(data)) as opened:
        # libjpeg's DCT scaling by the largest 1/2^k that keeps both sides >= the target: a
        # large speed-up on big photos; the resampling below then does the exact scaling.
        opened.draft("RGB", (image_size, image_size))
        image = _to_rgb(ImageOps.exif_transpose(opened))
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if size != image.size:
        # Area averaging when shrinking and cubic when enlarging, as make-data.py's OpenCV
        # resize did (spec §10.1).
        image = image.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)     # baseline, not progressive: PIL's default
    return out.getvalue(), np.asarray(image, dtype=np.uint8)


def _to_rgb(image):
    """Any PIL mode as 3-channel RGB: grey is repeated, CMYK and palettes converted, alpha
    dropped (as make-data.py's 3-channel decode did)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _read_source(ref):
    """The bytes of one image: `size` bytes at `offset` of `container` (a tar member), or the
    whole file when size < 0."""
    container, offset, size = ref[0], ref[1], ref[2]
    with open(container, "rb") as f:
        f.seek(offset)
        return f.read() if size < 0 else f.read(size)


def process_task(task):
    """Worker: ([refs], image_size, with_stats) -> ([(jpeg bytes or None, error or None)],
    stats or None). Stats are the sums a mean image and the pixel covariance need."""
    refs, image_size, with_stats = task
    results = []
    # uint32 holds a task's pixel sums (128 x 255) at half the transfer cost of int64.
    image_sum = np.zeros((image_size, image_size, 3), np.uint32) if with_stats else None
    products = np.zeros((3, 3), np.float64)
    for ref in refs:
        try:
            jpeg, pixels = resize_to_square(_read_source(ref), image_size)
        except Exception as e:    # any decoder failure means "unreadable": report and go on
            results.append((None, f"{type(e).__name__}: {e}"))
            continue
        results.append((jpeg, None))
        if with_stats:
            image_sum += pixels
            rgb = pixels.reshape(-1, 3).astype(np.float64)
            products += rgb.T @ rgb     # exact: per-image sums stay far below 2**53
    stats = (image_sum, products) if with_stats else None
    return results, stats


# ---------------------------------------------------------------------------------------------
# Finding the images. A ref is (container path, offset, size, display name, label).


def is_ilsvrc(src):
    """Whether src holds the ILSVRC-2012 tars (else a train/<class>/ tree)."""
    return (Path(src) / TRAIN_TAR).is_file()


def find_dataset(src, progress):
    """(label_names, training refs, validation refs) from either kind of source directory."""
    src = Path(src)
    if is_ilsvrc(src):
        return _ilsvrc_dataset(src, progress)
    if (src / "train").is_dir():
        return _folder_dataset(src, progress)
    raise DataError(f"{src}: found neither {TRAIN_TAR} (with {VAL_TAR} and {DEVKIT_TAR}) nor a "
                    f"train/<class>/ folder tree")


def _folder_dataset(src, progress):
    classes = sorted(d.name for d in (src / "train").iterdir()
                     if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{src / 'train'}: no class folders")
    label_of = {name: label for label, name in enumerate(classes)}
    progress("Building training set image list...")
    train = _folder_refs(src / "train", label_of)
    val = []
    if (src / "val").is_dir():
        val = _folder_refs(src / "val", label_of)
        val.sort(key=lambda ref: (Path(ref[3]).name, ref[3]))
    return classes, train, val


def _folder_refs(root, label_of):
    refs = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir()
                            and not d.name.startswith(".")):
        if class_dir.name not in label_of:
            raise DataError(f"{class_dir}: class folder not among the training classes")
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                refs.append((str(path), 0, -1, f"{root.name}/{class_dir.name}/{path.name}",
                             label_of[class_dir.name]))
    return refs


def _ilsvrc_dataset(src, progress):
    for name in (VAL_TAR, DEVKIT_TAR):
        if not (src / name).is_file():
            raise DataError(f"{src / name}: not found (expected with {TRAIN_TAR})")
    label_names, label_of_wnid, val_labels = _read_devkit(src / DEVKIT_TAR)
    train = _train_tar_refs(src / TRAIN_TAR, label_of_wnid, progress)
    with tarfile.open(src / VAL_TAR, "r:") as tar:
        members = sorted((m for m in tar if m.isfile()), key=lambda m: m.name)
    if len(members) != len(val_labels):
        raise DataError(f"{src / VAL_TAR}: {len(members)} images but the devkit's ground truth "
                        f"lists {len(val_labels)}")
    val = [(str(src / VAL_TAR), m.offset_data, m.size, m.name, label)
           for m, label in zip(members, val_labels)]
    return label_names, train, val


def _read_devkit(path):
    """label_names (synset words, ILSVRC2012_ID order), WNID -> label, validation labels."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading data/meta.mat needs scipy (pip install scipy, the "
                        f"[imagenet-tars] extra)") from None
    with tarfile.open(path, "r:gz") as tar:
        files = {m.name.split("/", 1)[-1]: m for m in tar if m.isfile()}
        missing = [name for name in (META_MAT, VAL_TRUTH) if name not in files]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)}")
        mat = loadmat(io.BytesIO(tar.extractfile(files[META_MAT]).read()), squeeze_me=True)
        truth = tar.extractfile(files[VAL_TRUTH]).read().decode().split()
    # Synsets with ILSVRC2012_ID 1..1000 are the leaf classes; label = ID - 1 (spec §10.1).
    synsets = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
                     for s in np.atleast_1d(mat["synsets"])
                     if 1 <= int(s["ILSVRC2012_ID"]) <= NUM_ILSVRC_CLASSES)
    label_names = [words for _, _, words in synsets]
    label_of_wnid = {wnid: ident - 1 for ident, wnid, _ in synsets}
    val_labels = [int(value) - 1 for value in truth]
    bad = [v + 1 for v in val_labels if not 0 <= v < len(label_names)]
    if bad:
        raise DataError(f"{path}: ground-truth label {bad[0]} is not an ILSVRC2012_ID in the "
                        f"devkit's meta.mat")
    return label_names, label_of_wnid, val_labels


def _train_tar_refs(path, label_of_wnid, progress):
    """Refs into the per-synset tars, addressed by absolute offset in the outer (uncompressed)
    tar, so workers read their images straight from the file."""
    with tarfile.open(path, "r:") as outer:
        synset_tars = [m for m in outer if m.isfile()]
        progress("Loaded synset tars.")
        progress("Building training set image list (this can take 10-20 minutes)...")
        refs, shown = [], -1
        for k, member in enumerate(synset_tars):
            wnid = Path(member.name).stem
            if wnid not in label_of_wnid:
                raise DataError(f"{path}: {member.name} is not a synset of the devkit's meta.mat")
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                refs.extend((str(path), member.offset_data + m.offset_data, m.size,
                             f"{member.name}/{m.name}", label_of_wnid[wnid])
                            for m in inner if m.isfile())
            percent = 10 * (10 * k // len(synset_tars))
            if percent != shown:
                progress(f"{percent}% ...", end=" ")
                shown = percent
        progress("done")
    return refs


# ---------------------------------------------------------------------------------------------
# Writing


class SetWriter:
    """Cuts the processed images of one set into batches and writes each as it fills."""

    def __init__(self, args, kind, first_batch, num_images, progress):
        self.args, self.kind, self.progress = args, kind, progress
        self.next_number, self.first = first_batch, first_batch
        self.expected = max(1, math.ceil(num_images / args.batch_size))
        self.data, self.labels = [], []
        self.written = self.skipped = 0
        self.started = time.time()

    def add(self, ref, jpeg, error):
        if jpeg is None:
            print(f"Skipping unreadable image {ref[3]}: {error}", file=sys.stderr)
            self.skipped += 1
            return
        self.data.append(jpeg)
        self.labels.append([ref[4]])
        if len(self.data) == self.args.batch_size:
            self.flush()

    def flush(self):
        if not self.data:
            return
        target = write_batch(self.args.tgt_dir, self.next_number,
                             {"data": self.data, "labels": self.labels},
                             sub_batch_size=self.args.sub_batch_size)
        index = self.next_number - self.first + 1
        self.progress(f"Wrote {target} ({self.kind} batch {index} of {self.expected}) "
                      f"({time.time() - self.started:.2f} sec)")
        self.written += len(self.data)
        self.data, self.labels = [], []
        self.next_number += 1
        self.started = time.time()

    @property
    def num_batches(self):
        return self.next_number - self.first


def write_set(pool, refs, args, kind, first_batch, progress, with_stats):
    """Process and write one set; returns its SetWriter and the summed (image, products)."""
    writer = SetWriter(args, kind, first_batch, len(refs), progress)
    tasks = [(refs[i:i + IMAGES_PER_TASK], args.image_size, with_stats)
             for i in range(0, len(refs), IMAGES_PER_TASK)]
    image_sum = np.zeros((args.image_size, args.image_size, 3), np.float64)
    products = np.zeros((3, 3), np.float64)
    for (results, stats), (chunk, _, _) in zip(pool.imap(process_task, tasks), tasks):
        for ref, (jpeg, error) in zip(chunk, results):
            writer.add(ref, jpeg, error)
        if stats is not None:
            image_sum += stats[0]
            products += stats[1]
    writer.flush()
    return writer, (image_sum, products)


def image_statistics(image_sum, products, num_images):
    """data_mean (num_vis, 1) float32 in R, G, B planes, and color_pca = (stdevs ascending,
    eigenvectors as columns) of the 3x3 covariance of all training pixels (spec §10.1)."""
    size = image_sum.shape[0]
    mean_image = image_sum / num_images
    data_mean = mean_image.transpose(2, 0, 1).reshape(-1, 1).astype(np.float32)
    num_pixels = num_images * size * size
    pixel_mean = mean_image.reshape(-1, 3).mean(axis=0)
    covariance = products / num_pixels - np.outer(pixel_mean, pixel_mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)           # ascending
    stdevs = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return data_mean, (stdevs, eigenvectors)


def make_batches(args, progress):
    """Everything main does, minus argument parsing and error printing; returns the summary."""
    progress("CROP_TO_SQUARE: True")
    progress(f"OUTPUT_IMAGE_SIZE: {args.image_size}")
    progress(f"NUM_WORKER_THREADS: {args.jobs}")
    label_names, train, val = find_dataset(args.src_dir, progress)
    if not train:
        raise DataError(f"{args.src_dir}: no training images found")
    random.Random(args.seed).shuffle(train)      # once, seeded (make-data.py's was unseeded)
    Path(args.tgt_dir).mkdir(parents=True, exist_ok=True)
    # fork: the workers need no re-import of this script, which may not be importable by name.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(args.jobs) as pool:
        progress("Writing training batches...")
        training, (image_sum, products) = write_set(pool, train, args, "training", 0,
                                                    progress, with_stats=True)
        if training.written == 0:
            raise DataError(f"{args.src_dir}: none of the {len(train)} training images could "
                            f"be read")
        first_val = math.ceil(training.num_batches / VALIDATION_ALIGN) * VALIDATION_ALIGN
        validation = None
        if val:
            progress("Writing validation batches...")
            validation, _ = write_set(pool, val, args, "validation", first_val, progress,
                                      with_stats=False)
    data_mean, color_pca = image_statistics(image_sum, products, training.written)
    write_meta(args.tgt_dir, {"data_mean": data_mean, "color_pca": color_pca,
                              "label_names": label_names, "batch_size": args.batch_size,
                              "num_vis": args.image_size ** 2 * 3})
    progress(f"Wrote {Path(args.tgt_dir) / 'batches.meta'}")
    return summary(training, validation, first_val)


def summary(training, validation, first_val):
    def describe(writer, kind, first):
        if writer is None or writer.num_batches == 0:
            return f"no {kind} images"
        last = first + writer.num_batches - 1
        return f"{writer.written} {kind} images in batches {first}-{last}"
    skipped = training.skipped + (validation.skipped if validation else 0)
    return (f"{describe(training, 'training', 0)}, "
            f"{describe(validation, 'validation', first_val)}; "
            f"{skipped} unreadable image{'s' if skipped != 1 else ''} skipped")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src-dir", required=True, help="ILSVRC-2012 tars or train/, val/ tree")
    parser.add_argument("--tgt-dir", required=True, help="output directory (created if missing)")
    parser.add_argument("--batch-size", type=int, default=3072,
                        help="images per data batch (default: %(default)s)")
    parser.add_argument("--sub-batch-size", type=int, default=1024,
                        help="images per sub-batch file (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="output side in pixels (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores, %(default)s here)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training shuffle (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "sub_batch_size", "image_size", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    def progress(line, end="\n"):
        print(line, end=end, flush=True)

    try:
        line = make_batches(args, progress)
    except (DataError, OSError, tarfile.TarError) as e:
        print(f"make_batches: {e}", file=sys.stderr)
        return 1
    print(line)
    # make-data.py's closing line (spec §9.3), naming ILSVRC 2012 only when that was the source
    kind = "ILSVRC 2012 batches" if is_ilsvrc(args.src_dir) else "Batches"
    print(f"All done! {kind} are in {args.tgt_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
