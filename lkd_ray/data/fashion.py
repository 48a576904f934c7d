"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline), torchvision's
download as the fallback. IDX files, gzip, read with numpy — no network needed."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import BadInput

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DataNotFound(BadInput):
    """The data set is not where the config says (exit 2)."""


class DataDamaged(BadInput):
    """A data file is there but unreadable, truncated or not what its name says (exit 2)."""


def _damaged(path: Path, problem: str) -> DataDamaged:
    return DataDamaged(f"data.root {path}", f"{problem}: the Fashion-MNIST data set in {path.parent} is damaged",
                       "copy the four IDX .gz files again (or reinstall dataset-fashion-mnist), or point data.root at an "
                       "intact copy")


def _read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file (gzip), checked: every failure names the file and says the data set is damaged."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except PermissionError as e:
        raise DataDamaged(f"data.root {path}", f"cannot be read ({e.strerror})", "make it readable for this user") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _damaged(path, f"is not a complete gzip file ({str(e).splitlines()[0]})") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or (ndim is not None and raw[3] != ndim):
        raise _damaged(path, f"is not an IDX file of {ndim or 'any'}-dimensional uint8 data (header {raw[:4].hex() or 'empty'})")
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), 4 + 4 * nd))
    if data.size != int(np.prod(dims)):
        shape = "×".join(map(str, dims)) + (f" = {int(np.prod(dims))}" if len(dims) > 1 else "")
        raise _damaged(path, f"holds {data.size} values where its header says {shape}")
    return data.reshape(dims)


def _load_split(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = FILES[split]
    x, y = _read_idx(d / imgs, 3), _read_idx(d / labels, 1).astype(np.int64)
    if len(x) != len(y) or x.shape[1:] != (28, 28):
        raise _damaged(d / labels, f"{len(y)} labels for {len(x)} images of {'×'.join(map(str, x.shape[1:]))} pixels in {imgs} "
                       "(expected one label per 28×28 image)")
    if y.size and not 0 <= y.min() <= y.max() < len(CLASSES):
        raise _damaged(d / labels, f"labels range over {y.min()}..{y.max()}, Fashion-MNIST has classes 0..{len(CLASSES) - 1}")
    return x, y


def _find_dir(root: str | None) -> Path | None:
    for cand in [root] if root else [os.environ.get("LKD_FASHION_MNIST"), DEBIAN_DIR]:
        if cand and all((Path(cand) / f).is_file() for pair in FILES.values() for f in pair):
            return Path(cand)
    return None


def _not_found(root: str) -> DataNotFound:
    d = Path(root)
    if not d.is_dir():
        problem = "no such folder" if not d.exists() else "is not a folder"
    else:
        missing = [f for pair in FILES.values() for f in pair if not (d / f).is_file()]
        problem = f"the folder lacks {', '.join(missing)}"
    return DataNotFound(f"data.root={root!r}", f"{problem} (Fashion-MNIST needs {', '.join(FILES['train'] + FILES['test'])})",
                        "point data.root at the folder holding the four IDX .gz files, or leave it unset to use the "
                        f"Debian package in {DEBIAN_DIR}")


def load_fashion_mnist(root: str | None = None, cache_dir: str = ".cache/lkd_ray") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images N×28×28 uint8, labels N), "test": (...)}``."""
    d = _find_dir(root)
    if d is not None:
        return {split: _load_split(d, split) for split in FILES}
    if root:
        raise _not_found(root)
    try:  # a laptop without the Debian package: torchvision downloads into the cache
        from torchvision.datasets import FashionMNIST

        out = {}
        for split in ("train", "test"):
            ds = FashionMNIST(os.path.join(cache_dir, "torchvision"), train=split == "train", download=True)
            out[split] = (ds.data.numpy(), ds.targets.numpy().astype(np.int64))
        return out
    except Exception as e:
        raise DataNotFound(
            "data.root", f"Fashion-MNIST is not in {DEBIAN_DIR} and the torchvision download failed "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, root) or set "
            "LKD_FASHION_MNIST / data.root to a folder holding the four IDX .gz files") from e
