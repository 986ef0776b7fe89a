"""Write a folder tree of real photographs for tests and benchmarks, with no download.

    python data/make_sample_photos.py --tgt DIR [--train N] [--val N] [--classes 10] [--seed S]

The photos bundled with scikit-learn (china.jpg, flower.jpg) and matplotlib (grace_hopper.jpg)
are cut into random crops of varied scale, position and mirroring, saved as JPEG in the
`train/<class>/`, `val/<class>/` layout that data/make_batches.py reads. Each class is one
source photo (with more classes than photos, photos repeat), so with up to three classes a
net can actually learn the task; the default, 10 classes, is what the shipped CIFAR-sized cfgs
expect (the ImageNet ones expect 1000). Real image statistics, made in seconds.
"""

import argparse
import os
import random

from PIL import Image


def source_photos(paths=None):
    if paths:
        return [Image.open(p).convert("RGB") for p in paths]
    import matplotlib
    import sklearn.datasets
    sklearn_dir = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    paths = [os.path.join(sklearn_dir, "china.jpg"), os.path.join(sklearn_dir, "flower.jpg"),
             os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")]
    return [Image.open(p).convert("RGB") for p in paths]


def random_crop(photo, rng, size):
    """A square crop of 35-100% of the short side, mirrored half the time, resized to `size`."""
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.35, 1.0))
    x, y = rng.randrange(width - side + 1), rng.randrange(height - side + 1)
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tgt", required=True, help="output directory (created if missing)")
    parser.add_argument("--train", type=int, default=300,
                        help="training photos in all (default: %(default)s)")
    parser.add_argument("--val", type=int, default=60,
                        help="validation photos in all (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10,
                        help="class k is cut from source photo k mod the number of photos; "
                             "10 is what the CIFAR-sized cfgs expect (default: %(default)s)")
    parser.add_argument("--size", type=int, default=320,
                        help="side of each saved photo (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the crops (default: %(default)s)")
    parser.add_argument("--src", nargs="*", help="photos to cut (default: the bundled ones)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    photos = source_photos(args.src)
    for split, count in (("train", args.train), ("val", args.val)):
        for k in range(count):
            label = k % args.classes
            folder = os.path.join(args.tgt, split, f"class{label:04d}")
            os.makedirs(folder, exist_ok=True)
            random_crop(photos[label % len(photos)], rng, args.size).save(
                os.path.join(folder, f"{split}_{k:06d}.jpg"), quality=90)
    print(f"Wrote {args.train} training and {args.val} validation photos of {args.classes} "
          f"classes to {args.tgt}")


if __name__ == "__main__":
    main()
