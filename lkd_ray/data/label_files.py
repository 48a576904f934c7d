"""A user's own labels, read and checked before anything trains: the noisy labels of every training image
(``data.noisy_labels``) and a small trusted subset with clean labels (``data.trusted``).

Formats, so published noisy-label sets load as they come:
  noisy labels  .npy (N,) integers; .csv / .txt one label a line (a header line is skipped); a CIFAR-N ``.pt``
                file — a dict of label arrays (CIFAR-10N: ``aggre_label``, ``worse_label``, ``random_label1..3``,
                ``clean_label``), read with ``torch.load(weights_only=True)`` and the key ``data.noisy_labels_key``
  trusted       .csv ``index,label`` a line (a header line is skipped); .npy (M, 2) integers
Every problem is a ``BadInput`` that names the field and the file and says what to do: a wrong length, a label outside the model's classes, a
trusted index out of range or given twice, a class the trusted set has too few images of.
"""
from __future__ import annotations

import io

import numpy as np

from ..errors import BadInput
from ..storage import read_uri_bytes


def LabelFileError(field: str, uri: str, problem: str, fix: str) -> BadInput:  # noqa: N802 - reads as the error it makes
    """Bad input naming the field and the file: one line, exit 2, from the CLI, the jobs and Ray workers alike."""
    return BadInput(f"{field}={uri}", problem, fix)


def _read(field: str, uri: str) -> bytes:
    try:
        return read_uri_bytes(uri)
    except FileNotFoundError:
        raise LabelFileError(field, uri, "no such file", "give the path or s3:// URI of an existing file") from None
    except IsADirectoryError:
        raise LabelFileError(field, uri, "is a folder", "give the path of the label file itself") from None


def _text_rows(field: str, uri: str, raw: bytes, cols: int) -> np.ndarray:
    rows = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.replace(";", ",").replace("\t", ",").split(",")]
        if cols == 1 and len(parts) > 1:
            parts = parts[-1:]  # "index,label" rows: the label is the last column
        try:
            rows.append([int(p) for p in parts[:cols]])
        except ValueError:
            if n == 1 and not rows:  # a header line
                continue
            raise LabelFileError(field, uri, f"line {n} is {line!r}, not {cols} integer(s)",
                                 "write one " + ("label" if cols == 1 else "index,label pair") + " per line") from None
        if len(rows[-1]) != cols:
            raise LabelFileError(field, uri, f"line {n} has {len(rows[-1])} value(s), {cols} expected",
                                 "write one index,label pair per line")
    return np.asarray(rows, dtype=np.int64).reshape(-1, cols)


def _pt_dict(field: str, uri: str, raw: bytes, key: str) -> np.ndarray:
    import torch

    core = getattr(np, "_core", None) or np.core  # numpy ≥ 2 names it _core
    safe = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    try:
        safe += [type(np.dtype(np.int64)), type(np.dtype(np.int32)), type(np.dtype(np.uint8))]
        with torch.serialization.safe_globals(safe):
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise LabelFileError(field, uri, f"not a readable .pt label file ({type(e).__name__})",
                             "save a dict of label arrays with torch.save, or give a .npy/.csv file") from None
    if isinstance(obj, dict):
        if key not in obj:
            raise LabelFileError(field, uri, f"has no array {key!r} (it has {sorted(map(str, obj))})",
                                 "set data.noisy_labels_key to one of those")
        obj = obj[key]
    return np.asarray(obj.numpy() if hasattr(obj, "numpy") else obj)


def load_noisy_labels(uri: str, n_train: int, num_classes: int, key: str = "worse_label") -> np.ndarray:
    """One label per training image, in the data set's order, each in 0..num_classes−1."""
    field = "data.noisy_labels"
    raw = _read(field, uri)
    low = uri.lower()
    if low.endswith(".pt") or low.endswith(".pth"):
        labels = _pt_dict(field, uri, raw, key)
    elif low.endswith(".npy"):
        try:
            labels = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise LabelFileError(field, uri, f"not a readable .npy array ({e})", "save it with numpy.save") from None
    else:
        labels = _text_rows(field, uri, raw, 1)[:, 0]
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise LabelFileError(field, uri, f"holds {labels.dtype} values, not class indices", "store integer labels")
    if len(labels) != n_train:
        raise LabelFileError(field, uri, f"has {len(labels)} labels, the training set has {n_train} images",
                             "give one label per training image, in the data set's order")
    _check_classes(field, uri, labels, np.arange(len(labels)), num_classes)
    return labels.astype(np.int64)


def _check_classes(field: str, uri: str, labels: np.ndarray, index: np.ndarray, num_classes: int) -> None:
    """Every label a class of the data set; the first that is not is named with its training-image index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise LabelFileError(field, uri, f"label {int(labels[bad[0]])} at index {int(index[bad[0]])} is not a class of "
                             f"this data set (0..{num_classes - 1}; {len(bad)} such label(s))", "fix or remove those labels")


def load_trusted(uri: str, n_train: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, clean labels) of a trusted subset of the training images."""
    field = "data.trusted"
    raw = _read(field, uri)
    if uri.lower().endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise LabelFileError(field, uri, f"not a readable .npy array ({e})", "save an (M, 2) array with numpy.save") from None
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "iu":
            raise LabelFileError(field, uri, f"is a {arr.dtype} array of shape {arr.shape}, not (M, 2) integers",
                                 "store one (index, label) row per trusted image")
    else:
        arr = _text_rows(field, uri, raw, 2)
    if len(arr) == 0:
        raise LabelFileError(field, uri, "holds no trusted images", "give at least a few per class")
    idx, lab = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
    out = np.flatnonzero((idx < 0) | (idx >= n_train))
    if len(out):
        raise LabelFileError(field, uri, f"index {int(idx[out[0]])} is outside the training set (0..{n_train - 1})",
                             "index the training images in the data set's order")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise LabelFileError(field, uri, f"index {int(uniq[counts > 1][0])} is given {int(counts.max())} times",
                             "list every trusted image once")
    _check_classes(field, uri, lab, idx, num_classes)
    return idx, lab


def write_example_labels(folder, clean, num_classes: int = 10, noise: float = 0.25, trusted_per_class: int = 20,
                         seed: int = 2025, write: bool = True) -> tuple[str, str]:
    """A user's label files, made from clean labels so the noisy-label path can be tried without one's own: every
    image's label, ``noise`` of them redrawn from a random row-stochastic confusion matrix (diagonal zero, peaked: a
    few likely mistakes per class, as annotators make), in the CIFAR-N ``.pt`` layout (``worse_label``,
    ``clean_label``); and ``trusted_per_class`` clean images per class as ``index,label`` CSV. Seeded; written
    atomically; returns (labels path, trusted path). ``write=False`` only names the paths."""
    from pathlib import Path

    import torch

    folder = Path(folder)
    labels, trusted = folder / "user_labels.pt", folder / "user_trusted.csv"
    if not write or (labels.is_file() and trusted.is_file()):
        return str(labels), str(trusted)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clean = np.asarray(clean)
    confusion = rng.dirichlet(np.full(num_classes - 1, 0.3), size=num_classes)
    given = clean.copy()
    flip = rng.random(len(clean)) < noise
    for i in np.flatnonzero(flip):
        others = [k for k in range(num_classes) if k != clean[i]]
        given[i] = others[rng.choice(num_classes - 1, p=confusion[clean[i]])]
    tmp = labels.with_suffix(".tmp")
    torch.save({"worse_label": given, "clean_label": clean}, tmp)
    tmp.replace(labels)
    picks = np.concatenate([rng.choice(np.flatnonzero(clean == c), trusted_per_class, replace=False)
                            for c in range(num_classes)])
    tmp = trusted.with_suffix(".tmp")
    tmp.write_text("index,label\n" + "".join(f"{i},{clean[i]}\n" for i in np.sort(picks)))
    tmp.replace(trusted)
    return str(labels), str(trusted)
