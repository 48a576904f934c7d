"""Bad input, tried as a new user would: every input through the CLI (``python -m lkd_ray train``) and a job
(``jobs/lkd_fashion.py``) gives exit 2, one last console line that names the input and what to do, no traceback, and
nothing under the run's storage prefix (so the fixed command is not blocked by a half-made run).

The checks run before any training, so each case stops within a second or two: the cases run in-process (the
commands' own ``main``); two subprocess runs prove what a real console shows."""
from __future__ import annotations

import gzip
import re
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))

from lkd_ray.errors import BadInput, explain  # noqa: E402

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _root(base: Path, name: str, replace: dict[str, bytes | None] | None = None) -> str:
    """A Fashion-MNIST root: links to the real files, with some replaced by the given bytes (None: left out)."""
    from lkd_ray.data.fashion import _find_dir

    src = _find_dir(None)
    d = base / name
    d.mkdir()
    for f in FILES:
        if replace and f in replace:
            if replace[f] is not None:
                (d / f).write_bytes(replace[f])
        else:
            (d / f).symlink_to(src / f)
    return str(d)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fashion_available):
    """One small set of bad inputs in a tmp dir, shared by every case."""
    from lkd_ray.data.fashion import _find_dir
    from lkd_ray.data.parquet import SCHEMA, iter_rows_from_arrays, write_meta, write_split
    from lkd_ray.models import build_model

    base = tmp_path_factory.mktemp("inputs")
    src = _find_dir(None)
    labels = gzip.decompress((src / FILES[1]).read_bytes())
    p = {
        "missing": _root(base, "missing", {FILES[3]: None}),
        "truncated": _root(base, "truncated", {FILES[0]: (src / FILES[0]).read_bytes()[:100_000]}),
        "not_idx": _root(base, "not_idx", {FILES[1]: gzip.compress(b"label,image\n0,shirt.png\n")}),
        "short": _root(base, "short", {FILES[1]: gzip.compress(labels[:-10])}),  # 10 labels fewer than its header says
        "nothere": str(base / "nothere.pt"),
        "text": str(base / "notes.pt"),
        "module": str(base / "module.pt"),
        "rgb": str(base / "rgb.pt"),
        "student": str(base / "student.pt"),
    }
    Path(p["text"]).write_text("these are my notes, not a checkpoint\n")
    clean = np.frombuffer(labels[8:], np.uint8).astype(np.int64)  # issue 25's label files, each wrong in one way
    p["labels_short"], p["labels_class"] = str(base / "short.npy"), str(base / "class.csv")
    np.save(p["labels_short"], clean[:-1])
    bad = clean.copy()
    bad[7] = 12
    Path(p["labels_class"]).write_text("\n".join(map(str, bad)) + "\n")
    p["trusted_dup"], p["trusted_far"] = str(base / "dup.csv"), str(base / "far.csv")
    Path(p["trusted_dup"]).write_text("index,label\n5,1\n5,1\n")
    Path(p["trusted_far"]).write_text("index,label\n60000,1\n")
    torch.save(torch.nn.Linear(2, 2), p["module"])  # a pickled module: not loadable with weights_only=True
    torch.save(build_model("cnn_teacher", 10, 3).state_dict(), p["rgb"])  # 3 input channels, the recipe has 1
    torch.save(build_model("cnn_student", 10, 1).state_dict(), p["student"])  # another architecture
    own, rgb = build_model("cnn_teacher", 10, 1).state_dict(), torch.load(p["rgb"], weights_only=True)
    p["rgb_key"] = next(k for k, v in own.items() if v.shape != rgb[k].shape)  # the first mismatching key, named
    p["rgb_shapes"] = f"{tuple(rgb[p['rgb_key']].shape)} vs {tuple(own[p['rgb_key']].shape)}"
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, pqroot = pafs.LocalFileSystem(), str(base / "shards")
    x, y = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10
    for split in ("train", "quiz"):
        write_split(fs, pqroot, split, iter_rows_from_arrays(x, y, np.arange(20)))
    fs.create_dir(f"{pqroot}/val")
    pq.write_table(pa.table({"id": np.arange(4), "label": np.arange(4), "img": [b"x"] * 4}), f"{pqroot}/val/part-00000.parquet")
    write_meta(fs, pqroot, {"classes": list(map(str, range(10))), "num_classes": 10, "image_size": 28, "channels": 1,
                            "mean": [0.5], "std": [0.5], "transform": {"kind": "crop_flip", "pad": 2},
                            "counts": {"train": 20, "quiz": 20, "val": 4}})
    p["shards"] = pqroot
    assert SCHEMA.names == ["id", "label", "image"]
    return p


# (case, --set overrides, what the last line must name); {name} is filled from the ``inputs`` fixture
CASES = [
    ("root-missing", ["data.root=/nonexistent/fmnist"], ["data.root='/nonexistent/fmnist'", "no such folder"]),
    ("root-lacks-a-file", ["data.root={missing}"], ["data.root", "t10k-labels-idx1-ubyte.gz"]),
    ("truncated-gz", ["data.root={truncated}"], ["train-images-idx3-ubyte.gz", "damaged"]),
    ("not-idx", ["data.root={not_idx}"], ["train-labels-idx1-ubyte.gz", "not an IDX file", "damaged"]),
    ("idx-size", ["data.root={short}"], ["train-labels-idx1-ubyte.gz", "59990 values", "60000", "damaged"]),
    ("quiz-per-class", ["data.quiz_per_class=100000"], ["data.quiz_per_class=100000", "at most 600"]),
    ("labels-per-class", ["data.labels_per_class=100000"], ["data.labels_per_class=100000", "at most 5400"]),
    ("teacher-missing", ["model.teacher_weights={nothere}"], ["model.teacher_weights=", "nothere.pt", "does not exist"]),
    ("teacher-not-a-checkpoint", ["model.teacher_weights={text}"], ["notes.pt", "weights_only=True", "torch.save"]),
    ("teacher-pickled-module", ["model.teacher_weights={module}"], ["module.pt", "weights_only=True", "state_dict"]),
    ("teacher-shape", ["model.teacher_weights={rgb}"], ["rgb.pt", "{rgb_key}: {rgb_shapes}"]),
    ("teacher-architecture", ["model.teacher_weights={student}"], ["student.pt", "does not fit model 'cnn_teacher'"]),
    ("lossnet-init-from", ["lossnet.init_from={nothere}"], ["lossnet.init_from=", "nothere.pt"]),
    ("parquet-schema", ["data.dataset=parquet", "data.root={shards}"], ["shards/val", "'image'", "missing"]),
    ("config-field", ["loss.tau=-1"], ["loss.tau"]),
    ("noisy-labels-length", ["data.noisy_labels={labels_short}"], ["data.noisy_labels=", "short.npy", "59999 labels"]),
    ("noisy-labels-class", ["data.noisy_labels={labels_class}"], ["class.csv", "label 12 at index 7", "not a class"]),
    ("noisy-labels-missing", ["data.noisy_labels={nothere}"], ["data.noisy_labels=", "nothere.pt", "no such file"]),
    ("trusted-repeat", ["data.trusted={trusted_dup}"], ["data.trusted=", "dup.csv", "index 5 is given 2 times"]),
    ("trusted-out-of-range", ["data.trusted={trusted_far}"], ["far.csv", "index 60000 is outside the training set"]),
    ("confusion-map-class", ["data.label_noise=0.3", "data.noise_kind=confusion", "data.confusion_map={{0: 12}}"],
     ["data.confusion_map=", "outside 0..9"]),
    ("select-per-class", ["data.quiz_per_class=50", "data.select_per_class=560"], ["data.select_per_class=560", "at most 550"]),
    ("ce-rule-without-teacher", ["loss.method=ce", "loss.ce_rule=agree"], ["loss", "reads the teacher"]),
]


def _fill(items, p):
    return [s.format(**p) for s in items]


def _check(code, out, err, expected, needles, prefix: Path):
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert code == expected, (out + err)[-3000:]
    assert "Traceback" not in out + err, (out + err)[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), (last, needles)
    assert len([x for x in lines if x.startswith("error:")]) == 1, lines
    assert not prefix.exists() or not any(prefix.rglob("*")), sorted(prefix.rglob("*"))  # nothing written for the run


@pytest.mark.parametrize("case,sets,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_cli(case, sets, needles, inputs, tmp_path, capsys):
    from lkd_ray.cli import main

    argv = ["train", "--set", "run.name=bad", "--set", f"run.out_dir={tmp_path / 'runs'}",
            "--set", f"run.cache_dir={tmp_path / 'cache'}"]
    for s in _fill(sets, inputs):
        argv += ["--set", s]
    code = main(argv)
    out, err = capsys.readouterr()
    assert not out.strip(), out
    _check(code, out, err, 2, _fill(needles, inputs), tmp_path / "runs" / "bad")


@pytest.mark.parametrize("case,sets,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_a_job(case, sets, needles, inputs, tmp_path, capsys):
    import lkd_fashion

    argv = ["--storage", str(tmp_path / "store"), "--set", "run.name=bad", "--set", f"run.cache_dir={tmp_path / 'cache'}"]
    for s in _fill(sets, inputs):
        argv += ["--set", s]
    with pytest.raises(SystemExit) as e:
        lkd_fashion.main(argv)
    out, err = capsys.readouterr()
    assert "== bad" not in out  # stopped before the run's banner
    _check(e.value.code, out, err, 2, _fill(needles, inputs), tmp_path / "store")


def test_the_ray_driver_checks_before_it_claims_the_run_name_or_starts_ray(inputs, tmp_path):
    """run_distributed itself (Tune trials, tests and the auto command call it directly) checks first: the bad input
    raises, run.json is not written, Ray is not started."""
    import ray

    from lkd_ray.config import build_config
    from lkd_ray.distributed.launch import LaunchOptions, run_distributed

    cfg = build_config("fashion_mnist", overrides=[f"data.root={inputs['truncated']}", "run.name=badroot"])
    was = ray.is_initialized()
    with pytest.raises(BadInput, match="train-images-idx3-ubyte.gz"):
        run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store")))
    assert not (tmp_path / "store").exists() and ray.is_initialized() == was
    fixed = build_config("fashion_mnist", overrides=["run.name=badroot"])
    from lkd_ray.distributed.launch import claim_run
    from lkd_ray.storage import open_storage

    assert claim_run(open_storage(str(tmp_path / "store")), "badroot", fixed) is None  # the fixed run is not blocked


def test_a_worker_that_meets_bad_input_reports_the_same_line_through_rays_wrappers():
    """What a Ray worker raised arrives pickled and wrapped (RayTaskError, Ray Train's worker failure): recognised by
    type, the same one line, exit 2."""
    import ray.exceptions
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from lkd_ray.data.fashion import DataDamaged
    from lkd_ray.models import TeacherLoadError

    for raised in (BadInput("data.noisy_labels=/x.npy", "holds 3 labels for 4 images", "one label per image"),
                   DataDamaged("data.root /d/train-images-idx3-ubyte.gz", "is not a complete gzip file", "copy it again"),
                   TeacherLoadError("model.teacher_weights='/t.pt'", "the teacher checkpoint does not exist", "give one")):
        shipped = pickle.loads(pickle.dumps(raised))  # how it leaves the worker
        assert type(shipped) is type(raised) and str(shipped) == str(raised)
        task = ray.exceptions.RayTaskError("train_loop_per_worker", "Traceback ...\nsome text", shipped).as_instanceof_cause()
        for wrapped in (task, WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(task, "Traceback ...")})):
            f = explain(wrapped)
            assert f is not None and f.code == 2 and f.line == str(raised), (f, raised)
    assert explain(RuntimeError("BadInput: only text")) is None  # text that names the type is not the type


def test_debug_shows_the_traceback_and_the_line_stays_last(inputs, tmp_path, capsys):
    from lkd_ray.cli import main

    code = main(["train", "--debug", "--set", f"data.root={inputs['truncated']}", "--set", f"run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: data.root ")


@pytest.mark.parametrize("cmd", [["-m", "lkd_ray", "train"], ["jobs/lkd_fashion.py"]], ids=["cli", "job"])
def test_a_real_console_shows_one_line_and_no_traceback(cmd, inputs, tmp_path):
    """The headline case on a real console: a truncated .gz names the file and says the data set is damaged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    env.pop("LKD_DEBUG", None)
    args = [sys.executable, *cmd, "--set", f"data.root={inputs['truncated']}", "--set", "run.name=badroot",
            "--set", f"run.out_dir={tmp_path / 'runs'}"] + (["--storage", str(tmp_path / "store")] if "jobs" in cmd[0] else [])
    r = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, env=env)
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stdout, r.stdout[-3000:]
    assert lines[-1].startswith("error: data.root ") and "train-images-idx3-ubyte.gz" in lines[-1] and "damaged" in lines[-1]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "store").exists()


def test_a_teacher_on_s3_that_is_not_there_or_not_weights_is_bad_input(moto_endpoint, s3_bucket, monkeypatch):
    """An s3:// teacher: a missing object is the user's input (exit 2), not a storage failure; a text object is not
    weights."""
    import boto3

    from lkd_ray.config import build_config
    from lkd_ray.train.inputs import check_inputs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="teachers/notes.pt", Body=b"not a checkpoint")
    for key, what in (("teachers/nothere.pt", "no such object"), ("teachers/notes.pt", "weights_only=True")):
        cfg = build_config("fashion_mnist", overrides=[f"model.teacher_weights=s3://{s3_bucket}/{key}"])
        with pytest.raises(BadInput, match=what) as e:
            check_inputs(cfg)
        assert explain(e.value).code == 2 and f"model.teacher_weights='s3://{s3_bucket}/{key}'" in explain(e.value).line


def test_a_parquet_root_on_s3_missing_is_bad_input_and_unreachable_is_storage(moto_endpoint, s3_bucket, monkeypatch):
    """No meta.json under a reachable bucket: prepare the shards (exit 2). An endpoint nobody listens on: the storage
    cannot be reached (exit 3), found within the outage bound — not "prepare the shards"."""
    import socket

    from lkd_ray.config import build_config
    from lkd_ray.train.inputs import check_inputs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("LKD_STORAGE_OUTAGE_S", "1")
    cfg = build_config("fashion_mnist", overrides=["data.dataset=parquet", f"data.root=s3://{s3_bucket}/nothing-here",
                                                   f"data.endpoint_url={moto_endpoint}"])
    with pytest.raises(BadInput, match="holds no meta.json") as e:
        check_inputs(cfg)
    assert explain(e.value).code == 2
    with socket.socket() as s:  # a port that was free a moment ago: nothing answers there
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = build_config("fashion_mnist", overrides=["data.dataset=parquet", f"data.root=s3://{s3_bucket}/shards",
                                                   f"data.endpoint_url={dead}"])
    with pytest.raises(Exception) as e:
        check_inputs(cfg)
    f = explain(e.value)
    assert f is not None and f.code == 3 and "cannot read" in f.line and "prepare the shards" not in f.line, f


def test_the_other_jobs_report_bad_data_the_same_way(tmp_path, capsys):
    """jobs/lkd_cifar.py (torchvision folders): a data root that is not there, one line, exit 2, nothing written."""
    import lkd_cifar

    with pytest.raises(SystemExit) as e:
        lkd_cifar.main(["--data", str(tmp_path / "cifar"), "--teacher-weights", str(tmp_path / "t.pt"),
                        "--storage", str(tmp_path / "store")])
    out, err = capsys.readouterr()
    _check(e.value.code, out, err, 2, [f"data.root='{tmp_path / 'cifar'}'", "is not a folder"], tmp_path / "store")
