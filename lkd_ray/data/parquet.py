"""Image data sets as Parquet shards (encoded image bytes + label + id) in any pyarrow filesystem.

Layout under a root: ``train/part-*.parquet`` (rows shuffled at write time, so no shard is one
class), ``quiz/…`` (held out of the training set at preparation time, stratified and seeded),
``val/…`` and ``meta.json`` (classes, counts, image size, normalisation and the augmentation
spec). Writing and decoding live here (no Ray); ``lkd_ray.distributed.streaming`` streams the train
split through Ray Data so decoding and augmentation run on CPU workers, not on the GPUs'.
Decoding applies the same augmentation spec as the in-memory path (``transforms``), keyed by
(seed, epoch, sample id), so both paths give the same tensor for the same image.
"""
from __future__ import annotations

import io
import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.int32()), ("image", pa.binary())])


def encode_image(img: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    """uint8 H×W or H×W×3 → PNG (lossless: small images) or JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    return encode_image(img, "JPEG", quality)


def write_split(fs, root: str, split: str, rows: Iterable[tuple[int, int, bytes]], rows_per_shard: int = 1000) -> dict:
    """Write (id, label, jpeg) rows as ``<root>/<split>/part-NNNNN.parquet``; returns counts."""
    fs.create_dir(f"{root}/{split}")
    shard, n, files = [], 0, []

    def flush():
        if not shard:
            return
        table = pa.Table.from_pylist([{"id": i, "label": y, "image": b} for i, y, b in shard], schema=SCHEMA)
        path = f"{root}/{split}/part-{len(files):05d}.parquet"
        with fs.open_output_stream(path) as out:  # one object per shard; S3 PUTs are atomic
            pq.write_table(table, out)
        files.append(path)
        shard.clear()

    for row in rows:
        shard.append(row)
        n += 1
        if len(shard) >= rows_per_shard:
            flush()
    flush()
    return {"rows": n, "shards": len(files)}


def write_meta(fs, root: str, meta: dict) -> None:
    with fs.open_output_stream(f"{root}/meta.json") as out:
        out.write(json.dumps(meta, indent=1).encode())


def read_meta(fs, root: str) -> dict:
    """The data set's meta.json. A missing file is FileNotFoundError (bad input: prepare the shards); storage that
    cannot be reached or read (pyarrow's S3 errors, which carry no type of their own) is ``StorageUnavailable``."""
    from ..errors import ARROW_MARKERS
    from ..storage import StorageUnavailable

    try:
        with fs.open_input_stream(f"{root}/meta.json") as f:
            return json.loads(f.read())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{root}/meta.json not found: prepare the shards with jobs/prepare_imagenet.py first ({e})") from e
    except OSError as e:
        if any(m in str(e) for m in ARROW_MARKERS):
            raise StorageUnavailable(f"cannot read {root}/meta.json: {str(e).splitlines()[0]} — check data.endpoint_url, "
                                     "the credentials and that the storage is up, then rerun") from e
        raise FileNotFoundError(f"{root}/meta.json not found: prepare the shards with jobs/prepare_imagenet.py first ({e})") from e


def read_split(fs, root: str, split: str) -> pa.Table:
    return pq.read_table(f"{root}/{split}", filesystem=fs, schema=SCHEMA)


def augmentation(meta: dict, size: int, train: bool):
    """The spec named by the data set's meta.json: ``crop_flip`` (small fixed-size images, decoded to
    the in-memory layout and augmented as tensors) or ``resized_crop_flip`` (ImageNet: PIL crops)."""
    from .transforms import CropFlip, ResizeCenterCrop, ResizedCropFlip

    t = meta.get("transform", {"kind": "resized_crop_flip"})
    if t["kind"] == "crop_flip":
        return CropFlip(int(t.get("pad", 2)), float(t.get("pad_value", 0.0))) if train else None
    if t["kind"] == "resized_crop_flip":
        return ResizedCropFlip(size) if train else ResizeCenterCrop(size, int(round(size * 256 / 224)))
    raise ValueError(f"unknown transform kind {t['kind']!r} in meta.json")


def decode_batch(batch: dict, meta: dict, size: int, channels: int, train: bool, seed: int = 0, epoch: int = 0) -> dict:
    """Decode image bytes and apply the data set's spec → float32 N×C×S×S, normalised.

    Runs in Ray Data's CPU workers for the train split and in-process for quiz/val. ``crop_flip``
    images are decoded exactly as the in-memory loader holds them (zero-padded to ``size``, channels
    repeated) and then augmented with the same views, so the two paths agree bit for bit.
    """
    from PIL import Image

    from .transforms import CropFlip, pil_to_tensor

    mean, std = meta["mean"], meta["std"]
    spec = augmentation(meta, size, train)
    ids = np.asarray(batch["id"], np.int64)
    out = np.empty((len(batch["image"]), channels, size, size), np.float32)
    small = meta.get("transform", {}).get("kind") == "crop_flip"
    for i, raw in enumerate(batch["image"]):
        img = Image.open(io.BytesIO(raw))
        if small:
            a = pil_to_tensor(img, 1, mean[:1], std[:1])[0]
            p = size - a.shape[-1]
            if p < 0:
                raise ValueError(f"image_size {size} is smaller than the stored images ({a.shape[-1]} pixels)")
            fill = -mean[0] / std[0]
            a = np.pad(a, ((p // 2, p - p // 2), (p // 2, p - p // 2)), constant_values=fill)
            out[i] = np.broadcast_to(a, (channels, size, size))
        else:
            out[i] = pil_to_tensor(spec.apply_pil(img, seed, epoch, int(ids[i])), channels, mean, std)
    if small and isinstance(spec, CropFlip):
        import torch

        out = spec.apply(torch.from_numpy(out), spec.views(ids, seed, epoch)).numpy()
    return {"x": out, "y": np.asarray(batch["label"], np.int64), "id": ids}


def iter_rows_from_arrays(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, fmt: str = "PNG") -> Iterator[tuple[int, int, bytes]]:
    for i, y, img in zip(ids, labels, images):
        yield int(i), int(y), encode_image(img, fmt)
