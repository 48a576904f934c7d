"""Teacher outputs computed once (FKD, Shen & Xing, ECCV 2022): the frozen teacher's logits for K
augmented views of every training image, stored as Parquet in storage and keyed like the teacher.
A student step then draws a view from the K and reads the teacher's logits instead of running it.

With K = 0 (the default) every distinct view of the in-memory augmentation is cached (pad 2 crop +
flip: 50 views), and each epoch picks exactly the view the live path would pick: the student sees
the same data and the same teacher outputs, minus the teacher's forward pass. With 0 < K < all
views, each image keeps K views chosen once (recorded per image), as FKD does.

Layout (under the storage root): ``teacher_outputs/<key>/part-NNNNN.parquet`` with one row per
image (``id``, ``views``: the K view numbers, ``logits``: K × C float32) and ``meta.json``, written
last, so a half-written cache is never read. Logits only: a feature loss needs the live teacher.
"""
from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import torch

from ..data.loaders import InMemoryLoader
from ..data.transforms import hash_u64
from ..storage import Storage, StorageError

FORMAT_VERSION = 1
ROWS_PER_PART = 4096


def cache_key(teacher_key: str, loader: InMemoryLoader, views: int, data_identity: str) -> str:
    spec = loader.augment
    blob = json.dumps({"v": FORMAT_VERSION, "teacher": teacher_key, "data": data_identity, "views": views,
                       "spec": None if spec is None else {"kind": type(spec).__name__, **spec.__dict__},
                       "n": len(loader.labels)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def view_table(loader: InMemoryLoader, k: int) -> np.ndarray | None:
    """N × K view numbers per image, or None when every view is cached (slot = view)."""
    spec = loader.augment
    if spec is None:
        return None
    total = spec.num_views
    if k == 0 or k >= total:
        return None
    keys = hash_u64(0xFCD, loader.ids[:, None], np.arange(total)[None, :])  # a fixed, per-image random subset
    return np.argsort(keys, axis=1)[:, :k].astype(np.int64)


@torch.inference_mode()
def compute_logits(loader: InMemoryLoader, teacher: torch.nn.Module, device: torch.device, k: int = 0,
                   chunk: int = 1024, progress: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
    """(N × slots × C logits, N × slots views or None): the teacher on every cached view, in eval mode."""
    spec = loader.augment
    table = view_table(loader, k)
    slots = 1 if spec is None else (table.shape[1] if table is not None else spec.num_views)
    n = len(loader.labels)
    teacher = teacher.to(device).eval().to(memory_format=torch.channels_last)  # ~1.3× faster convolutions on CPU
    out = None
    from tqdm.auto import tqdm

    bar = tqdm(total=n * slots, desc="teacher outputs (once)", leave=False, dynamic_ncols=True, disable=not progress,
               mininterval=1.0)
    for start in range(0, n, chunk):
        x = loader.images[start:start + chunk]
        for s in range(slots):
            if spec is None:
                xv = x
            else:
                v = table[start:start + chunk, s] if table is not None else np.full(len(x), s)
                xv = spec.apply(x, v)
            z = teacher(xv.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
            if out is None:
                out = torch.empty(n, slots, z.shape[1])
            out[start:start + len(x), s] = z
            bar.update(len(x))
    bar.close()
    return out, table


def save(storage: Storage, prefix: str, loader: InMemoryLoader, logits: torch.Tensor, table: np.ndarray | None, info: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, slots, c = logits.shape
    views = table if table is not None else np.broadcast_to(np.arange(slots), (n, slots))
    flat = logits.reshape(n, slots * c).numpy()
    parts = 0
    for start in range(0, n, ROWS_PER_PART):
        sl = slice(start, start + ROWS_PER_PART)
        tbl = pa.table({"id": pa.array(loader.ids[sl], pa.int64()),
                        "views": pa.FixedSizeListArray.from_arrays(pa.array(views[sl].reshape(-1).astype(np.int16)), slots),
                        "logits": pa.FixedSizeListArray.from_arrays(pa.array(flat[sl].reshape(-1)), slots * c)})
        buf = io.BytesIO()
        pq.write_table(tbl, buf)
        storage.put_bytes(f"{prefix}/part-{parts:05d}.parquet", buf.getvalue())
        parts += 1
    storage.put_json(f"{prefix}/meta.json", {**info, "parts": parts, "rows": n, "slots": slots, "classes": c,
                                             "all_views": table is None})


def load(storage: Storage, prefix: str, loader: InMemoryLoader) -> tuple[torch.Tensor, torch.Tensor | None]:
    import pyarrow.parquet as pq

    meta = storage.get_json(f"{prefix}/meta.json")
    ids, views, logits = [], [], []
    for i in range(meta["parts"]):
        t = pq.read_table(io.BytesIO(storage.get_bytes(f"{prefix}/part-{i:05d}.parquet")))
        ids.append(t.column("id").to_numpy())
        views.append(np.asarray(t.column("views").combine_chunks().flatten()).reshape(len(t), meta["slots"]))
        logits.append(np.asarray(t.column("logits").combine_chunks().flatten()).reshape(len(t), meta["slots"], meta["classes"]))
    ids, views, logits = np.concatenate(ids), np.concatenate(views), np.concatenate(logits)
    pos = {int(i): j for j, i in enumerate(ids)}
    try:
        order = np.fromiter((pos[int(i)] for i in loader.ids), np.int64, len(loader.ids))
    except KeyError as e:
        raise StorageError(f"teacher-output cache {storage.uri}/{prefix} has no row for sample {e}; delete it to rebuild") from None
    table = None if meta["all_views"] else torch.from_numpy(views[order].astype(np.int64))
    return torch.from_numpy(logits[order]), table


def copy(src: Storage, dst: Storage, prefix: str) -> None:
    """A finished cache from one storage to another: the parts, then ``meta.json`` last (never half-read)."""
    meta = src.get_json(f"{prefix}/meta.json")
    for i in range(meta["parts"]):
        key = f"{prefix}/part-{i:05d}.parquet"
        dst.put_bytes(key, src.get_bytes(key))
    dst.put_json(f"{prefix}/meta.json", meta)


def attach(loader: InMemoryLoader, teacher: torch.nn.Module | None, teacher_key: str, data_identity: str, k: int,
           storage: Storage, device: torch.device, log=print, progress: bool = True, seed_from: Storage | None = None) -> dict:
    """Load the cache (building it once if missing) and attach it to the training loader. ``seed_from``: another
    storage (this machine's cache folder) whose finished cache is copied into ``storage`` instead of recomputing it:
    the outputs are keyed by content, so the copy is the same cache (a 54k-image cache is ~10 CPU-minutes)."""
    if not isinstance(loader, InMemoryLoader):
        raise ValueError("the teacher-output cache needs an in-memory training set (fashion_mnist, synthetic)")
    key = cache_key(teacher_key, loader, k, data_identity)
    prefix = f"teacher_outputs/{key}"
    t0 = time.perf_counter()
    if (not storage.exists(f"{prefix}/meta.json") and seed_from is not None and seed_from.uri != storage.uri
            and seed_from.exists(f"{prefix}/meta.json")):
        log(f"teacher outputs: copying the cache from {seed_from.uri}/{prefix} to {storage.uri}/{prefix}")
        copy(seed_from, storage, prefix)
    if storage.exists(f"{prefix}/meta.json"):
        logits, table = load(storage, prefix, loader)
        info = {**storage.get_json(f"{prefix}/meta.json"), "built": False}
    else:
        if teacher is None:
            raise ValueError("the teacher-output cache is missing and no teacher was given to build it")
        log(f"teacher outputs: computing {len(loader.labels)} images × "
            f"{loader.augment.num_views if loader.augment and not k else max(k, 1)} views once (cached at {storage.uri}/{prefix})")
        logits, table = compute_logits(loader, teacher, device, k, progress=progress)
        info = {"key": key, "teacher_key": teacher_key, "views_requested": k, "build_s": time.perf_counter() - t0}
        save(storage, prefix, loader, logits, table, info)
        table = None if table is None else torch.from_numpy(table)
        info = {**info, "slots": logits.shape[1], "rows": logits.shape[0], "built": True}
    loader.attach_teacher_cache(logits, table)
    return {**info, "location": f"{storage.uri}/{prefix}", "load_s": time.perf_counter() - t0}
