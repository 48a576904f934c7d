"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline), torchvision's
download as the fallback. IDX files, gzip, read with numpy — no network needed."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DataNotFound(FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_dir(root: str | None) -> Path | None:
    for cand in [root] if root else [os.environ.get("LKD_FASHION_MNIST"), DEBIAN_DIR]:
        if cand and all((Path(cand) / f).is_file() for pair in FILES.values() for f in pair):
            return Path(cand)
    return None


def load_fashion_mnist(root: str | None = None, cache_dir: str = ".cache/lkd_ray") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images N×28×28 uint8, labels N), "test": (...)}``."""
    d = _find_dir(root)
    if d is not None:
        return {split: (_read_idx(d / imgs), _read_idx(d / labels).astype(np.int64)) for split, (imgs, labels) in FILES.items()}
    if root:
        raise DataNotFound(f"no Fashion-MNIST IDX files ({', '.join(FILES['train'] + FILES['test'])}) under {root!r}")
    try:  # a laptop without the Debian package: torchvision downloads into the cache
        from torchvision.datasets import FashionMNIST

        out = {}
        for split in ("train", "test"):
            ds = FashionMNIST(os.path.join(cache_dir, "torchvision"), train=split == "train", download=True)
            out[split] = (ds.data.numpy(), ds.targets.numpy().astype(np.int64))
        return out
    except Exception as e:
        raise DataNotFound(
            f"Fashion-MNIST not found in {DEBIAN_DIR} and the torchvision download failed ({e}). "
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, root) or set "
            "LKD_FASHION_MNIST / data.root to a folder holding the four IDX .gz files.") from e
