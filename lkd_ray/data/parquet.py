"""Image data sets as Parquet shards (JPEG bytes + label + id) in any pyarrow filesystem (local, S3).

Layout under a root: ``train/part-*.parquet``, ``quiz/…`` (held out of the training set at
preparation time, stratified and seeded), ``val/…`` and ``meta.json`` (classes, counts, image
size). Writing and decoding live here (no Ray); ``lkd_ray.distributed.streaming`` streams the
train split through Ray Data so decoding and augmentation run on CPU workers, not on the GPUs'.
"""
from __future__ import annotations

import io
import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.int32()), ("image", pa.binary())])


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """uint8 H×W or H×W×3 → JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


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
    try:
        with fs.open_input_stream(f"{root}/meta.json") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{root}/meta.json not found: prepare the shards with jobs/prepare_imagenet.py first ({e})") from e


def read_split(fs, root: str, split: str) -> pa.Table:
    return pq.read_table(f"{root}/{split}", filesystem=fs, schema=SCHEMA)


def decode_batch(batch: dict, size: int, channels: int, mean, std, train: bool, seed: int = 0) -> dict:
    """Decode JPEG bytes, resize/crop to ``size``, flip when training, normalise → float32 N×C×S×S.

    Runs in Ray Data's CPU workers for the train split and in-process for quiz/val.
    """
    from PIL import Image

    rng = np.random.default_rng([seed, int(batch["id"][0]) if len(batch["id"]) else 0])
    out = np.empty((len(batch["image"]), channels, size, size), np.float32)
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    for i, raw in enumerate(batch["image"]):
        img = Image.open(io.BytesIO(raw)).convert("RGB" if channels == 3 else "L")
        if train:  # random-resized-crop-lite: random scale of the shorter side, random crop, flip
            w, h = img.size
            scale = rng.uniform(1.0, 1.15)
            img = img.resize((max(size, int(round(w * scale * size / min(w, h)))), max(size, int(round(h * scale * size / min(w, h))))))
            w, h = img.size
            x0, y0 = rng.integers(0, w - size + 1), rng.integers(0, h - size + 1)
            img = img.crop((x0, y0, x0 + size, y0 + size))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((size, size))
        a = np.asarray(img, np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[i] = (a - m) / s
    return {"x": out, "y": np.asarray(batch["label"], np.int64), "id": np.asarray(batch["id"], np.int64)}


def iter_rows_from_arrays(images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Iterator[tuple[int, int, bytes]]:
    for i, y, img in zip(ids, labels, images):
        yield int(i), int(y), encode_jpeg(img)
