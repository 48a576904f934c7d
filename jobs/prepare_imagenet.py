"""Write an image data set as Parquet shards (JPEG bytes + label + id) for streaming at cluster scale.

    python jobs/prepare_imagenet.py --src /data/imagenet --dst s3://bucket/imagenet-parquet
    python jobs/prepare_imagenet.py --from-fashion-mnist 2000 --dst /tmp/fmnist-parquet   # small offline set

Splits: train/ (rows in a seeded random order, so no shard holds one class) and quiz/ (a
stratified, seeded hold-out of the training images for the meta-objective) and val/. meta.json names
the augmentation the training recipe applies (the same spec as the in-memory path). Then train with ``--set data.dataset=parquet --set data.root=<dst>``:
the train split streams through Ray Data with decoding on CPU workers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from lkd_ray.data import stratified_split  # noqa: E402
from lkd_ray.data.parquet import encode_image, write_meta, write_split  # noqa: E402
from lkd_ray.storage import StorageError, open_storage  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _image_folder(root: str):
    from torchvision.datasets import ImageFolder

    tr, va = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val"))
    def rows(samples, idx):
        for i in idx:
            path, y = samples[i]
            yield int(i), int(y), Path(path).read_bytes()  # ImageNet files are JPEG already: no re-encode
    return (tr.classes, tr.samples, [y for _, y in tr.samples], va.samples, rows, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
            {"kind": "resized_crop_flip"})


def _fashion(n: int):
    from lkd_ray.data.fashion import CLASSES, load_fashion_mnist

    raw = load_fashion_mnist()
    (trx, tr_y), (tex, te_y) = raw["train"], raw["test"]
    trx, tr_y, tex, te_y = trx[:n], tr_y[:n], tex[: max(10, n // 5)], te_y[: max(10, n // 5)]
    def rows(samples, idx):
        imgs, labels = samples
        for i in idx:
            yield int(i), int(labels[i]), encode_image(imgs[i], "PNG")  # lossless: the same pixels as the in-memory path
    mean, std = [0.2860] * 3, [0.3530] * 3
    return (CLASSES, (trx, tr_y), list(tr_y), (tex, te_y), rows, 28, 1, mean, std,
            {"kind": "crop_flip", "pad": 2, "pad_value": -mean[0] / std[0]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="ImageFolder root with train/ and val/")
    src.add_argument("--from-fashion-mnist", type=int, metavar="N", help="use the first N Fashion-MNIST training images")
    ap.add_argument("--dst", required=True, help="local folder or s3://bucket/prefix")
    ap.add_argument("--endpoint-url", default=None)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--quiz-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        storage = open_storage(args.dst, args.endpoint_url)
        storage.check()
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    fs, base = storage.arrow_fs()
    classes, train, labels, val, rows, size, channels, mean, std, transform = (
        _image_folder(args.src) if args.src else _fashion(args.from_fashion_mnist))
    tr_idx, quiz_idx = stratified_split(np.asarray(labels), args.quiz_fraction, args.seed)
    tr_idx = np.random.default_rng([args.seed, 1]).permutation(tr_idx)  # class folders are sorted: shuffle the rows
    n_val = len(val[1]) if isinstance(val, tuple) else len(val)
    counts = {}
    from tqdm.auto import tqdm

    for split, samples, idx in (("train", train, tr_idx), ("quiz", train, quiz_idx), ("val", val, np.arange(n_val))):
        it = tqdm(rows(samples, idx), total=len(idx), desc=f"writing {split}", leave=False)
        counts[split] = write_split(fs, base, split, it, args.rows_per_shard)["rows"]
    write_meta(fs, base, {"classes": list(classes), "num_classes": len(classes), "image_size": size, "channels": channels,
                          "mean": mean, "std": std, "transform": transform, "counts": counts, "quiz_fraction": args.quiz_fraction, "seed": args.seed})
    print(f"wrote {counts} to {storage.uri}")
    return 0


if __name__ == "__main__":
    from lkd_ray.errors import user_errors

    with user_errors():  # bad input exits 2, storage 3, one line (LKD_DEBUG=1: the traceback)
        raise SystemExit(main())
