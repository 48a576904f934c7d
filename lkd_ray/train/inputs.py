"""The inputs a config names, checked before any work: the CLI and the Ray driver call ``check_inputs(cfg)`` before
a teacher is trained, a worker starts or anything is written under the run's name.

Cheap checks only (labels and headers read, a checkpoint loaded once, no training): data files present, intact and
of the right shapes (IDX headers and sizes, gzip integrity, Parquet schema), labels inside the model's classes,
regime sizes (``labels_per_class``, ``quiz_per_class``) against the data, the teacher checkpoint present, loadable
with ``weights_only=True`` and shaped like ``model.teacher``, a loss network to start from that fits. Every problem
raises ``lkd_ray.errors.BadInput`` (exit 2, one line naming the input).

A new input plugs in as one more ``_check_*`` called from ``check_inputs`` that raises
``BadInput(input="data.FIELD=VALUE", problem="what is wrong", fix="what to do")``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import BadInput

_checked: dict[str, "DataFacts"] = {}  # configs checked in this process (a job checks before launching, the driver again)
_data_checked: dict[str, "DataFacts"] = {}


@dataclass(frozen=True)
class DataFacts:
    """What the checks learned about the data: its classes and channels, and the clean training labels when cheap."""

    num_classes: int | None
    in_channels: int
    train_labels: np.ndarray | None = None


def check_inputs(cfg: Config) -> DataFacts:
    """Raise ``BadInput`` for the first bad input ``cfg`` names; return what was learned about the data."""
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k in ("model", "data", "loss", "lossnet")}, sort_keys=True)
    if key in _checked:
        return _checked[key]
    data_key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    facts = _data_checked.get(data_key) or check_data(cfg)  # one job's kd and lkd runs share the data: read it once
    if facts.train_labels is not None:
        check_regime(cfg, facts)
    check_teacher(cfg, facts)
    check_lossnet_init(cfg)
    _checked[key] = _data_checked[data_key] = facts
    return facts


def check_data(cfg: Config) -> DataFacts:
    d = cfg.data
    if d.dataset == "synthetic":
        return DataFacts(d.num_classes_override or 10, d.channels)
    if d.dataset == "fashion_mnist":
        from ..data.fashion import load_fashion_mnist

        raw = load_fashion_mnist(d.root, cfg.run.cache_dir)  # reads and checks every file: ~1 s
        return DataFacts(10, d.channels, raw["train"][1])
    if d.dataset in ("cifar10", "cifar100"):
        from ..data.vision import _datasets

        train, _, test = _datasets(d, None, None)
        k = len(train.classes)
        for name, ds in (("training", train), ("test", test)):
            y = np.asarray(ds.targets)
            if y.size and not 0 <= y.min() <= y.max() < k:
                raise BadInput(f"data.root={d.root!r}", f"the {name} labels range over {y.min()}..{y.max()}, the data set "
                               f"has {k} classes", f"the {d.dataset} copy is damaged: copy it again")
        return DataFacts(k, 3, np.asarray(train.targets))
    if d.dataset == "imagenet":  # listing 1.3 M files is not cheap: the layout only
        root = d.root or ""
        for sub in ("train", "val"):
            if not os.path.isdir(os.path.join(root, sub)):
                raise BadInput(f"data.root={d.root!r}", f"{os.path.join(root, sub)!r} is not a folder",
                               "an ImageNet root needs train/ and val/ class folders (ImageFolder layout)")
        return DataFacts(len([e for e in os.scandir(os.path.join(root, "train")) if e.is_dir()]), 3)
    if d.dataset == "parquet":
        return _check_parquet(cfg)
    return DataFacts(None, d.channels)


def _check_parquet(cfg: Config) -> DataFacts:
    """meta.json readable and complete; every split's schema holds id, label and image; labels inside the classes
    (read for the splits of at most 64 shards: the label column only)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from ..data.parquet import SCHEMA, read_meta
    from ..storage import open_storage

    d = cfg.data
    where = f"data.root={d.root!r}"
    fs, base = open_storage(d.root, d.endpoint_url).arrow_fs()
    try:
        meta = read_meta(fs, base)
    except FileNotFoundError:
        raise BadInput(where, "holds no meta.json", "prepare the shards with jobs/prepare_imagenet.py first, or point "
                       "data.root at their folder") from None
    except ValueError as e:  # not JSON
        raise BadInput(f"{d.root}/meta.json", f"is not JSON ({e})", "write it again with jobs/prepare_imagenet.py") from None
    missing = [k for k in ("num_classes", "counts", "image_size", "mean", "std") if k not in meta]
    if missing:
        raise BadInput(f"{d.root}/meta.json", f"lacks {', '.join(missing)}", "write it again with jobs/prepare_imagenet.py")
    k = int(meta["num_classes"])
    for split in ("train", "quiz", "val"):
        try:
            ds = pads.dataset(f"{base}/{split}", filesystem=fs, format="parquet")
        except (FileNotFoundError, pa.ArrowInvalid, OSError) as e:
            raise BadInput(f"{d.root}/{split}", f"cannot be read as Parquet shards ({str(e).splitlines()[0]})",
                           "prepare the shards with jobs/prepare_imagenet.py") from None
        if not ds.files:
            raise BadInput(f"{d.root}/{split}", "holds no Parquet shards", "prepare the shards with jobs/prepare_imagenet.py")
        for f in SCHEMA:
            got = ds.schema.field(f.name).type if f.name in ds.schema.names else None
            ok = got is not None and (pa.types.is_integer(got) if f.name != "image" else
                                      pa.types.is_binary(got) or pa.types.is_large_binary(got))
            if not ok:
                raise BadInput(f"{d.root}/{split}", f"column {f.name!r} is {got or 'missing'}; the shards need "
                               f"{', '.join(f'{x.name}: {x.type}' for x in SCHEMA)}", "write them with jobs/prepare_imagenet.py")
        if len(ds.files) <= 64:
            y = ds.to_table(columns=["label"]).column("label").to_numpy()
            if y.size and not 0 <= y.min() <= y.max() < k:
                raise BadInput(f"{d.root}/{split}", f"labels range over {y.min()}..{y.max()}, meta.json says {k} classes",
                               "fix meta.json's num_classes or the labels, and write the shards again")
    return DataFacts(k, d.channels)  # the quiz split is made when the shards are written: no regime to check


def check_regime(cfg: Config, facts: DataFacts) -> None:
    """The run's splits drawn once from the clean labels: labels_per_class and quiz_per_class fit every class."""
    from ..data.bundle import split_for

    y = facts.train_labels
    split_for(cfg.data, y, facts.num_classes or int(y.max()) + 1)


def check_teacher(cfg: Config, facts: DataFacts) -> None:
    """A teacher checkpoint given as a path or s3:// URI: present, weights-only, shaped like ``model.teacher``.
    (torchvision and http(s) weights are downloaded by the run itself: not cheap here.)"""
    from ..losses.methods import METHODS
    from ..models import load_teacher

    src = cfg.model.teacher_weights
    if not src or src == "random" or not METHODS[cfg.loss.method].needs_teacher or facts.num_classes is None:
        return
    if src.startswith(("torchvision", "http://", "https://")):
        return
    load_teacher(cfg.model.teacher, src, facts.num_classes, facts.in_channels)


def check_lossnet_init(cfg: Config) -> None:
    """``lossnet.init_from``: a loss-network version that fits this config's loss network."""
    if not cfg.lossnet.init_from:
        return
    from ..losses import build_lossnets
    from .run import load_lossnets_from

    nets = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    if nets is not None:
        load_lossnets_from(nets, cfg)
