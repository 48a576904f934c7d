"""End-to-end single-process runs on real Fashion-MNIST and on generated data."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from lkd_ray.config import build_config
from lkd_ray.data import Batch, build_data
from lkd_ray.models import build_model
from lkd_ray.train import ESPopulation, Trainer, TrainingDiverged, build_run
from lkd_ray.train.teacher_source import CachedTeacher
from lkd_ray.train.outputs import default_outputs
from lkd_ray.train.snapshots import InMemorySnapshotStore, draw_index
from lkd_ray.train.teacher import prepare_teacher, teacher_cache_path


@pytest.fixture(scope="module")
def fashion_setup(tmp_path_factory, fashion_available):
    cache = tmp_path_factory.mktemp("cache")
    cfg = build_config("fashion_mnist", run={"cache_dir": str(cache), "progress": False},
                       data={"train_subset": 20000}, model={"teacher_epochs": 2}, optim={"epochs": 2})
    data = build_data(cfg.data, cfg.run.seed)
    teacher, info = prepare_teacher(cfg, data, log=lambda *_: None)
    return cfg, data, teacher, info


@pytest.mark.slow


def test_lkd_on_fashion_mnist_learns_the_loss_and_the_student(fashion_setup, tmp_path):
    cfg, data, teacher, info = fashion_setup
    assert len(info["curve"]) == 2  # a short teacher: what is checked below is that distillation transfers it

    def agreement(trainer) -> float:
        """How often the student predicts what the teacher predicts, over the test set: what distillation transfers."""
        trainer.bundle.eval()
        with torch.no_grad():
            same = sum(int((trainer.bundle(b.x).logits.argmax(1) == teacher(b.x).argmax(1)).sum()) for b in data.test)
        return 100.0 * same / data.test_size

    ce_cfg = cfg.model_copy(deep=True)
    ce_cfg.loss.method = "ce"
    ce = build_run(ce_cfg, data=data).fit(progress=False)  # the same recipe without a teacher
    kd_cfg = cfg.model_copy(deep=True)
    kd_cfg.loss.method = "kd"
    kd = build_run(kd_cfg, data=data, teacher=teacher, teacher_info=info).fit(progress=False)
    ag_ce, ag_kd = agreement(ce["_trainer"]), agreement(kd["_trainer"])
    assert ag_kd > ag_ce + 2.0, (ag_kd, ag_ce)  # distilling makes the student follow its teacher; CE does not
    cfg = cfg.model_copy(deep=True)
    cfg.meta.meta_every = 8
    cfg.meta.snapshot_every = 25
    cfg.meta.p_snapshot = 0.5
    run = build_run(cfg, data=data, teacher=teacher, teacher_info=info)
    phi0 = [p.detach().clone() for p in run.trainer.lossnets.parameters()]
    res = run.fit(tmp_path)
    assert abs(res["test_top1"] - kd["test_top1"]) < 3.0, (res["test_top1"], kd["test_top1"])  # LKD starts as KD and stays near it
    assert agreement(res["_trainer"]) > ag_ce + 2.0  # ... and distils: a student trained without its teacher would fail here
    moved = [not torch.equal(a, b) for a, b in zip(phi0, run.trainer.lossnets.parameters())]
    assert all(moved), "every loss-network tensor should move under meta-gradients"
    steps = res["steps"]
    assert res["meta"]["accepted"] == steps // 8 and res["meta"]["rejected_nonfinite"] == 0
    assert res["meta"]["from_snapshot"] > 0
    assert len(run.trainer.meta.snapshots) == steps // 25
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test_top1"] == res["test_top1"] and saved["epochs"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "quiz_top1" in json.loads(lines[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    versions = sorted(p.name for p in (tmp_path / "lossnet").glob("v*.pt"))
    assert versions == sorted(f"v{v}.pt" for v in {0, res["history"][0]["meta_version"], res["meta"]["version"]})
    ptr = json.loads((tmp_path / "lossnet" / "latest.json").read_text())
    assert ptr["version"] == res["meta"]["version"]


def test_teacher_cache_is_reused(fashion_setup):
    cfg, data, _, info = fashion_setup
    msgs = []
    _, info2 = prepare_teacher(cfg, data, log=msgs.append)
    assert info2 == info and "cached" in msgs[0]


def _write_idx(path, arr):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def _small_fashion_root(root, shift: int):
    """A Fashion-MNIST-shaped copy (600 train, 100 test images); ``shift`` changes its content."""
    from lkd_ray.data.fashion import load_fashion_mnist

    raw = load_fashion_mnist()
    root.mkdir(parents=True)
    (tx, ty), (vx, vy) = raw["train"], raw["test"]
    _write_idx(root / "train-images-idx3-ubyte.gz", np.roll(tx[:600], shift, axis=2).astype(np.uint8))
    _write_idx(root / "train-labels-idx1-ubyte.gz", ty[:600].astype(np.uint8))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", vx[:100].astype(np.uint8))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", vy[:100].astype(np.uint8))
    return str(root)


@pytest.mark.parametrize("change", ["data.root", "data.train_subset", "data.augment", "data.batch_size", "optim.lr",
                                    "optim.weight_decay", "model.teacher_epochs"])


def test_teacher_cache_key_covers_everything_that_trains_the_teacher(tmp_path, change, fashion_available):
    base = {"data": {"root": _small_fashion_root(tmp_path / "fm0", 0), "batch_size": 50, "train_subset": 500},
            "model": {"teacher_epochs": 1}, "run": {"cache_dir": str(tmp_path / "cache"), "progress": False}}
    changed = {"data.root": ("data", "root", _small_fashion_root(tmp_path / "fm1", 3)), "data.train_subset": ("data", "train_subset", 400),
               "data.augment": ("data", "augment", False), "data.batch_size": ("data", "batch_size", 25),
               "optim.lr": ("optim", "lr", 0.02), "optim.weight_decay": ("optim", "weight_decay", 1e-4),
               "model.teacher_epochs": ("model", "teacher_epochs", 2)}[change]
    cfg = build_config("fashion_mnist", **base)
    msgs = []
    prepare_teacher(cfg, build_data(cfg.data, 0, cache_dir=cfg.run.cache_dir), log=msgs.append)
    prepare_teacher(cfg, build_data(cfg.data, 0, cache_dir=cfg.run.cache_dir), log=msgs.append)  # unchanged: reused
    assert "training" in msgs[0] and "cached" in msgs[-1]
    section, field, value = changed
    other = build_config("fashion_mnist", **{**base, section: {**base.get(section, {}), field: value}})
    data2 = build_data(other.data, 0, cache_dir=other.run.cache_dir)
    assert teacher_cache_path(other, data2) != teacher_cache_path(cfg, build_data(cfg.data, 0))
    msgs.clear()
    prepare_teacher(other, data2, log=msgs.append)
    assert "training" in msgs[0]  # retrained, not reused


def _synthetic(**over):
    sections = {"data": {"dataset": "synthetic", "synthetic_size": 256, "batch_size": 32, "channels": 1, "image_size": 16},
                "optim": {"epochs": 1}, "run": {"progress": False}}
    for k, v in over.items():
        sections[k] = {**sections.get(k, {}), **v}
    cfg = build_config("fashion_mnist", **sections)
    return cfg, build_data(cfg.data)


def test_teacher_student_class_mismatch_is_clear():
    cfg, data = _synthetic()
    with pytest.raises(ValueError, match=r"teacher cnn_teacher predicts 7 classes but the data set synthetic has 10"):
        build_run(cfg, data=data, teacher=build_model("cnn_teacher", 7, 1))


def test_a_ramp_says_in_the_run_log_what_it_does_and_when_the_run_is_another_length():
    """``loss.ramp_epochs`` counts epochs: a run of another length than the ramp was tuned over says so, and how to
    make it ramp over the whole run."""
    from lkd_ray.train.run import ramp_schedule

    cfg, data = _synthetic(loss={"method": "dist", "ramp_epochs": 4, "ramp_weight": 2.0, "ramp_tau": 1.5},
                           optim={"epochs": 2})
    lines = []
    build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1), log=lines.append)
    ramp = [ln for ln in lines if ln.startswith("loss ramp:")]
    assert len(ramp) == 1 and "DIST's inter-class term ×1 → ×2" in ramp[0] and "τ ×1 → ×1.5 over 4 epochs" in ramp[0]
    assert "ends at 50% of the ramp" in ramp[0] and "loss.ramp_epochs=2" in ramp[0]
    kd = cfg.loss.model_copy(update={"method": "kd"})
    assert ramp_schedule(kd, 10).endswith("over 4 epochs, then held for the last 6 of 10") and "KD's term" in ramp_schedule(kd, 10)
    assert ramp_schedule(kd, 4).endswith("over 4 epochs")
    assert ramp_schedule(cfg.loss.model_copy(update={"ramp_epochs": 0}), 4) is None
    lines.clear()
    build_run(_synthetic(loss={"method": "dist"})[0], data=data, teacher=build_model("cnn_teacher", 10, 1), log=lines.append)
    assert not [ln for ln in lines if ln.startswith("loss ramp:")]


def test_nan_meta_gradient_is_rejected_and_training_goes_on():
    cfg, data = _synthetic(meta={"meta_every": 2, "p_snapshot": 0.0})
    data.quiz.images[:] = float("nan")  # every quiz loss, hence every meta-gradient, is NaN
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    phi0 = [p.detach().clone() for p in run.trainer.lossnets.parameters()]
    res = run.fit(progress=False)
    assert res["meta"]["rejected_nonfinite"] == res["steps"] // 2 > 0 and res["meta"]["accepted"] == 0
    assert all(torch.equal(a, b) for a, b in zip(phi0, run.trainer.lossnets.parameters()))


def test_diverging_student_stops_with_advice():
    cfg, data = _synthetic(loss={"method": "kd"})
    data.train.images[:] = float("inf")
    with pytest.raises(TrainingDiverged, match="lower optim.lr"):
        build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1)).fit(progress=False)


@pytest.mark.parametrize("method,extra", [
    ("ce", {}), ("kd", {}), ("dkd", {}), ("dist", {}), ("lkd", {}), ("control", {}),
    ("lkd", {"lossnet": {"lock": "norm"}}), ("lkd", {"lossnet": {"lock": "nontarget"}}),
    ("lkd", {"meta": {"estimator": "implicit", "neumann_steps": 2}}),
    ("lkd", {"lossnet": {"kind": "sample"}}), ("lkd", {"lossnet": {"kind": "sample", "base": "dist"}}),
])


def test_every_method_runs_through_one_loop_with_features(method, extra, tmp_path):
    over = {"loss": {"method": method, "w_feat": 0.5}, "meta": {"meta_every": 3, "scope": "head"}}
    for k, v in extra.items():
        over.setdefault(k, {}).update(v)
    cfg, data = _synthetic(**over)
    teacher = build_model("cnn_teacher", 10, 1)
    run = build_run(cfg, data=data, teacher=teacher)
    res = run.fit(tmp_path, progress=False)
    trainer = run.trainer
    assert res["epochs"] == 1 and res["test_top1"] is not None
    assert trainer.bundle.connector is not None
    if method in ("lkd", "control"):
        assert res["meta"]["accepted"] == res["steps"] // 3 > 0
    # checkpoints are weights-only loadable and restore exactly
    path = tmp_path / "ckpt.pt"
    torch.save(trainer.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    other = build_run(cfg, data=data, teacher=teacher).trainer
    other.load_state_dict(sd)
    assert other.state.step == trainer.state.step
    for a, b in zip(trainer.bundle.parameters(), other.bundle.parameters()):
        assert torch.equal(a, b)
    if trainer.lossnets is not None:
        for a, b in zip(trainer.lossnets.parameters(), other.lossnets.parameters()):
            assert torch.equal(a, b)
    json.loads((tmp_path / "result.json").read_text(),  # strict JSON: json.loads alone would accept NaN
               parse_constant=lambda c: pytest.fail(f"result.json holds {c}"))


@pytest.mark.parametrize("schedule,expected_ratio", [("constant", 1.0), ("student", 0.5)])


def test_meta_lr_follows_the_student_schedule_when_asked(schedule, expected_ratio):
    # cosine over 2 epochs: the student's lr in epoch 2 is lr0·(1 + cos(π/2))/2 = lr0/2
    cfg = build_config("fashion_mnist", data={"dataset": "synthetic", "synthetic_size": 256, "batch_size": 32, "image_size": 16},
                       optim={"epochs": 2, "schedule": "cosine"}, run={"progress": False},
                       meta={"meta_every": 2, "p_snapshot": 0.0, "lr_schedule": schedule})
    data = build_data(cfg.data)
    run = build_run(cfg, data=data, teacher=build_model(cfg.model.teacher, data.num_classes, data.in_channels))
    res = run.fit(progress=False)
    assert res["meta"]["accepted"] > 0
    assert run.trainer.meta.updater.adam.param_groups[0]["lr"] == pytest.approx(cfg.meta.lr * expected_ratio)


def test_freeze_after_epoch_stops_meta_updates_and_fresh_batches_are_other_batches():
    cfg, data = _synthetic(optim={"epochs": 2}, meta={"meta_every": 2, "p_snapshot": 0.0, "freeze_after_epoch": 1,
                                                       "batch_source": "fresh"})
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    seen = []
    compute = run.trainer.meta.step_fn.compute

    def spy(bundle, opt, batches, *a, **k):  # records what the meta-step unrolls on; computes as usual
        seen.append(batches[0].inputs.clone())
        return compute(bundle, opt, batches, *a, **k)

    run.trainer.meta.step_fn.compute = spy
    last = []
    step = run.trainer.train_step

    def record_step(batch):
        last.append(batch.x.clone())
        return step(batch)

    run.trainer.train_step = record_step
    res = run.fit(progress=False)
    per_epoch = len(data.train)
    v1, v2 = (h["meta_version"] for h in res["history"])
    assert v1 == per_epoch // 2 and v2 == v1  # no meta-update after epoch 1
    assert len(seen) == per_epoch // 2
    trained_on = [last[2 * i + 1] for i in range(len(seen))]  # the batch the student had just stepped on
    assert all(not torch.equal(s, t) for s, t in zip(seen, trained_on))


def test_a_meta_step_unrolls_a_subset_of_the_batch_and_takes_a_smaller_quiz_batch_when_asked():
    """``meta.unroll_batch_size`` and ``data.quiz_batch_size`` set a meta-step's cost: the unroll sees the first N images
    of the batch the student just stepped on (the same images, in order), the quiz batch its own size, and φ moves."""
    cfg, data = _synthetic(data={"quiz_batch_size": 8},
                           meta={"meta_every": 2, "p_snapshot": 0.0, "unroll_batch_size": 12})
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    seen, quiz = [], []
    compute = run.trainer.meta.step_fn.compute

    def spy(bundle, opt, batches, xq, yq, *a, **k):  # records what the meta-step unrolls on; computes as usual
        seen.append([(b.inputs.clone(), b.y.clone(), b.t_logits.shape) for b in batches])
        quiz.append(len(yq))
        return compute(bundle, opt, batches, xq, yq, *a, **k)

    run.trainer.meta.step_fn.compute = spy
    stepped = []
    step = run.trainer.train_step

    def record_step(batch):
        stepped.append((batch.x.clone(), batch.y.clone()))
        return step(batch)

    run.trainer.train_step = record_step
    phi0 = [p.detach().clone() for p in run.trainer.lossnets.parameters()]
    res = run.fit(progress=False)
    assert len(seen) == res["steps"] // 2 > 0 and set(quiz) == {8}
    for i, ((x, y, t_shape),) in enumerate(seen):
        sx, sy = stepped[2 * i + 1]  # the batch the student had just stepped on: its first 12 images
        assert torch.equal(x, sx[:12]) and torch.equal(y, sy[:12]) and t_shape[0] == 12
    assert res["meta"]["accepted"] == len(seen)
    assert any(not torch.equal(a, b) for a, b in zip(phi0, run.trainer.lossnets.parameters()))


@pytest.mark.parametrize("sampling", ["recent", "gaussian"])


def test_snapshot_sampling_ablations_follow_their_distributions(sampling):
    from scipy.stats import chisquare

    rng = __import__("random").Random(0)
    n, draws = 20, 20000
    counts = np.bincount([draw_index(n, sampling, rng) for _ in range(draws)], minlength=n)
    if sampling == "recent":  # uniform over the newest quarter
        assert counts[:15].sum() == 0
        assert chisquare(counts[15:]).pvalue > 1e-3
    else:  # half-normal back from the newest, σ = n/4, folded at the oldest
        from scipy.stats import halfnorm

        edges = np.arange(n + 1)
        p = np.diff(halfnorm.cdf(edges, scale=n / 4))
        p[-1] += 1 - p.sum()
        expected = p[::-1] * draws
        assert chisquare(counts, expected).pvalue > 1e-3
    store = InMemorySnapshotStore(sampling, max_snapshots=8)
    for s in range(12):
        store.record(s, {"w": torch.tensor(float(s))})
    assert len(store) == 8 and min(store.sample(rng)["w"].item() for _ in range(200)) >= 4  # bounded: the oldest went


def test_dkd_warmup_scales_the_term_linearly():
    from lkd_ray.losses import StudentOutputs, TeacherOutputs, build_method

    cfg, _ = _synthetic(loss={"method": "dkd", "dkd_warmup_epochs": 4, "w_ce": 0.0})
    full_cfg = cfg.loss.model_copy(update={"dkd_warmup_epochs": 0})
    zs, zt, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    m, ref = build_method(cfg.loss), build_method(full_cfg)
    base = ref(StudentOutputs(zs), TeacherOutputs(zt), y, epoch=0)[0].item()
    for epoch, frac in ((0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)):
        assert m(StudentOutputs(zs), TeacherOutputs(zt), y, epoch=epoch)[0].item() == pytest.approx(frac * base, rel=1e-6)


def test_a_step_with_cached_teacher_outputs_equals_a_step_with_the_live_teacher(tmp_path):
    cfg, _ = _synthetic(loss={"method": "kd"}, run={"cache_dir": str(tmp_path), "progress": False})
    teacher = build_model("cnn_teacher", 10, 1).eval()
    cached_cfg = cfg.model_copy(deep=True)
    cached_cfg.model.teacher_cache = True
    live = build_run(cfg, teacher=teacher, teacher_info={"key": "t0"})
    cached = build_run(cached_cfg, teacher=teacher, teacher_info={"key": "t0"})
    assert isinstance(cached.trainer.teacher, CachedTeacher) and cached.info["teacher_cache"]["built"]
    assert cached.info["teacher_cache"]["slots"] == 50  # every view of pad-2 crop + flip
    a, b = next(iter(live.data.train)), next(iter(cached.data.train))
    assert a.t_logits is None and torch.equal(a.x, b.x) and torch.equal(a.ids, b.ids)  # the same view ...
    with torch.no_grad():
        torch.testing.assert_close(b.t_logits, teacher(b.x), rtol=1e-5, atol=1e-5)  # ... and the teacher's logits for it
    live.trainer.train_step(a)
    cached.trainer.train_step(b)
    for p, q in zip(live.trainer.bundle.parameters(), cached.trainer.bundle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    again = build_run(cached_cfg, teacher=teacher, teacher_info={"key": "t0"})
    assert not again.info["teacher_cache"]["built"]  # computed once, then read from storage
    other = build_run(cached_cfg, teacher=teacher, teacher_info={"key": "another-teacher"})
    assert other.info["teacher_cache"]["built"]  # keyed like the teacher
    k = cached_cfg.model_copy(deep=True)
    k.model.teacher_cache_views = 4
    fkd = build_run(k, teacher=teacher, teacher_info={"key": "t0"})
    assert fkd.info["teacher_cache"]["slots"] == 4
    loader = fkd.data.train
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:  # every view drawn is one of the image's 4 recorded views, with its logits
            rows = {int(i): r for r, i in enumerate(loader.ids)}
            idx = torch.tensor([rows[int(i)] for i in batch.ids])
            with torch.no_grad():
                torch.testing.assert_close(batch.t_logits, teacher(batch.x), rtol=1e-5, atol=1e-5)
            assert all(int(v) in loader.cached_views[r].tolist() for r, v in zip(idx, loader.views_for(idx.numpy())[1]))


def test_a_run_on_other_storage_copies_the_local_teacher_output_cache_instead_of_recomputing_it(tmp_path):
    from lkd_ray.storage import open_storage

    cfg, _ = _synthetic(loss={"method": "kd"}, run={"cache_dir": str(tmp_path / "local"), "progress": False},
                        model={"teacher_cache": True})
    teacher = build_model("cnn_teacher", 10, 1).eval()
    here = build_run(cfg, teacher=teacher, teacher_info={"key": "t0"})  # built into the local cache folder
    assert here.info["teacher_cache"]["built"]
    remote = open_storage(str(tmp_path / "search" / "cache"))
    logs: list[str] = []
    there = build_run(cfg, teacher=teacher, teacher_info={"key": "t0"}, cache_storage=remote, log=logs.append)
    info = there.info["teacher_cache"]
    assert not info["built"] and info["location"].startswith(remote.uri)  # read from the search's storage ...
    assert any("copying the cache" in m for m in logs)  # ... after a copy, not a recompute
    prefix = info["location"][len(remote.uri) + 1:]
    assert remote.get_json(f"{prefix}/meta.json")["parts"] >= 1
    torch.testing.assert_close(there.data.train.teacher_logits, here.data.train.teacher_logits, rtol=0, atol=0)
    other = build_run(cfg, teacher=teacher, teacher_info={"key": "another-teacher"}, cache_storage=remote)
    assert other.info["teacher_cache"]["built"]  # nothing local under that key: computed as before


def test_a_learned_loss_is_reused_frozen_from_a_run_folder(tmp_path):
    cfg, data = _synthetic(meta={"meta_every": 2, "p_snapshot": 0.0})
    teacher = build_model("cnn_teacher", 10, 1)
    first = build_run(cfg, data=data, teacher=teacher)
    first.fit(tmp_path / "learn", progress=False)
    learned = {k: v.clone() for k, v in first.trainer.lossnets.state_dict().items()}
    reuse = cfg.model_copy(deep=True)
    reuse.lossnet.init_from, reuse.lossnet.frozen, reuse.run.seed = str(tmp_path / "learn"), True, 5
    run = build_run(reuse, data=data, teacher=teacher)
    assert run.trainer.meta is None and run.info["lossnet"]["version"] == first.trainer.meta.version()
    res = run.fit(progress=False)
    assert res["meta"] is None
    for k, v in run.trainer.lossnets.state_dict().items():
        assert torch.equal(v, learned[k])  # loaded, and unchanged by training
    bad = cfg.model_copy(deep=True)
    bad.lossnet.init_from, bad.lossnet.hidden = str(tmp_path / "learn"), [3]
    with pytest.raises(ValueError, match="does not fit this run's loss network"):
        build_run(bad, data=data, teacher=teacher)
    missing = cfg.model_copy(deep=True)
    missing.lossnet.init_from = str(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="holds no loss-network version"):
        build_run(missing, data=data, teacher=teacher)


def test_es_runs_particles_in_one_process_through_the_same_trainer_and_moves_the_centre():
    cfg, data = _synthetic(meta={"estimator": "es", "es_particles": 4, "meta_every": 2, "es_sigma": 0.5, "lr": 0.05})
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    tr = run.trainer
    assert isinstance(tr, Trainer) and isinstance(tr.meta, ESPopulation) and len(tr.meta.particles) == 3
    particles = [tr] + tr.meta.particles  # this trainer's student is particle 0
    center = tr.meta.lossnets
    last0 = center.logit.g[-1].weight.detach().clone()
    p0 = [t.lossnets.logit.g[-1].weight.detach().clone() for t in particles]
    torch.testing.assert_close(p0[0] - last0, -(p0[1] - last0))  # antithetic pair
    res = run.fit(progress=False)
    assert res["meta"]["version"] == res["steps"] // 2 and len(res["particles"]) == 4
    assert res["test_top1"] == pytest.approx(sum(p["test_top1"] for p in res["particles"]) / 4)  # the population's mean
    assert not torch.equal(center.logit.g[-1].weight, last0)  # the centre moved ...
    assert torch.equal(center.logit.g[0].weight, build_run(cfg, data=data, teacher=build_model(
        "cnn_teacher", 10, 1)).trainer.meta.lossnets.logit.g[0].weight)  # ... only in the perturbed (last) layer
    students = [t.bundle.net.fc.weight for t in particles]
    assert not torch.equal(students[0], students[1])  # each particle trained its own student


def test_outputs_are_strict_json_and_appended_per_attempt(tmp_path):
    cfg, data = _synthetic(loss={"method": "kd"})
    teacher = build_model("cnn_teacher", 10, 1)
    for _ in range(2):
        build_run(cfg, data=data, teacher=teacher).fit(tmp_path, progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the second attempt appended
    from lkd_ray.train.outputs import dumps

    assert json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.0]})) == {"a": None, "b": [None, 1.0]}
    assert default_outputs(tmp_path, cfg.to_dict())
    assert Batch(torch.zeros(1), torch.zeros(1)).t_logits is None


def test_a_learned_loss_is_reused_from_s3(tmp_path, s3_bucket, moto_endpoint, monkeypatch):
    from lkd_ray.meta.versions import VersionStore
    from lkd_ray.storage import S3Settings, S3Storage

    cfg, data = _synthetic(meta={"meta_every": 2, "p_snapshot": 0.0})
    teacher = build_model("cnn_teacher", 10, 1)
    first = build_run(cfg, data=data, teacher=teacher)
    first.fit(progress=False)
    st = S3Storage(s3_bucket, "learned", S3Settings(endpoint_url=moto_endpoint))
    VersionStore(st, "lossnet").save(7, {"lossnets": first.trainer.lossnets.state_dict(), "config": cfg.to_dict()})
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for uri in (f"s3://{s3_bucket}/learned", f"s3://{s3_bucket}/learned/lossnet/v7.pt"):
        reuse = cfg.model_copy(deep=True)
        reuse.lossnet.init_from, reuse.lossnet.frozen = uri, True
        run = build_run(reuse, data=data, teacher=teacher)
        assert run.info["lossnet"]["version"] == 7
        for k, v in run.trainer.lossnets.state_dict().items():
            assert torch.equal(v, first.trainer.lossnets.state_dict()[k])


def test_student_steps_do_not_sync_with_the_host_and_divergence_names_its_step(monkeypatch):
    """The step keeps loss terms on the device; the host reads them (and the divergence mark) once per
    ``run.log_every`` steps. Counted here by every way a tensor becomes a Python number."""
    cfg, data = _synthetic(loss={"method": "kd"}, run={"log_every": 4, "progress": False})
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    batches = iter([b for _, b in zip(range(3), data.train)])  # the loader's own shuffling happens before counting
    calls = []
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tr = run.trainer
    for _ in range(3):
        tr.train_step(next(batches))
    assert calls == []  # three steps, not one host sync
    monkeypatch.undo()
    bad, _ = _synthetic(loss={"method": "kd"}, run={"log_every": 100, "progress": False})
    data2 = build_data(bad.data)
    first = next(iter(data2.train))  # the third batch of epoch 1 is poisoned: found at the epoch's end, named
    data2.train.set_epoch(0)
    ids = [b.ids for b in data2.train][2]
    rows = torch.tensor([int((torch.from_numpy(data2.train.ids) == i).nonzero()) for i in ids])
    data2.train.images[rows] = float("inf")
    assert first is not None
    with pytest.raises(TrainingDiverged, match="non-finite at step 3 "):
        build_run(bad, data=data2, teacher=build_model("cnn_teacher", 10, 1)).fit(progress=False)


def test_a_resumed_stream_seeks_instead_of_replaying():
    from lkd_ray.data import cycle

    _, data = _synthetic()
    loader = data.train
    n = len(loader)
    assert n > 3
    replayed = cycle(loader)
    for _ in range(n + 2):
        next(replayed)
    expect = next(replayed)
    built = []
    orig = type(loader).iter_from

    def spy(self, first):
        built.append(first)
        return orig(self, first)

    type(loader).iter_from = spy
    try:
        got = next(cycle(loader, start=n + 2))
    finally:
        type(loader).iter_from = orig
    assert torch.equal(got.x, expect.x) and torch.equal(got.y, expect.y)  # the batch the replay reaches ...
    assert built == [2]  # ... reached by seeking into the second pass, not by building n + 2 batches


def test_a_fresh_batch_stream_never_moves_the_training_loader_s_epoch():
    """meta.batch_source=fresh draws from a fork of the training loader: with two fresh batches per step its stream
    enters its next pass halfway through epoch 0, and the batches the student trains on in epoch 0 stay exactly
    those of the loader's epoch 0 (the stream once set the shared loader's epoch, changing the rest of the epoch's
    augmentation); its own order is not the training order."""
    cfg, data = _synthetic(meta={"meta_every": 1, "unroll_steps": 2, "p_snapshot": 0.0, "batch_source": "fresh"})
    assert data.train.augment is not None
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    trained, step = [], run.trainer.train_step

    def record_step(batch):
        trained.append(batch.x.clone())
        return step(batch)

    run.trainer.train_step = record_step
    run.fit(progress=False)
    assert run.trainer.meta.fresh.consumed == 2 * len(trained) > len(data.train)  # the stream passed an epoch
    ref = build_data(cfg.data).train
    ref.set_epoch(0)
    expected = [b.x for b in ref]
    assert len(trained) == len(expected)
    for i, (a, b) in enumerate(zip(trained, expected)):
        assert torch.equal(a, b), f"training batch {i} of epoch 0 differs from the loader's epoch 0"
    ref.set_epoch(0)
    fresh = run.trainer.meta.fresh._own
    fresh.set_epoch(0)
    assert not torch.equal(next(iter(fresh)).y, next(iter(ref)).y)


def test_a_ray_shard_s_fork_keeps_its_own_epoch_and_leaves_the_epoch_clock_alone():
    """The streaming loader's fork (a fresh-batch stream on Ray) has no handle on the run's shared epoch clock and no
    id record: its passes never move the epoch the workers' augmentation reads."""
    pytest.importorskip("ray")
    from lkd_ray.distributed.streaming import StreamingLoader

    clock = object()  # the EpochClock actor's handle; the fork must not keep it
    loader = StreamingLoader(shard=None, batch_size=4, rows=64, world_size=2, record_ids=True, clock=clock)
    fork = loader.fork()
    assert fork.clock is None and not fork.record_ids and fork.shard is loader.shard and len(fork) == len(loader)
    fork.set_epoch(3)
    assert (fork.epoch, loader.epoch, loader.clock) == (3, 0, clock)


def test_an_es_population_stops_when_any_particle_diverges_not_only_the_owner():
    from lkd_ray.train import TrainingDiverged

    cfg, data = _synthetic(meta={"estimator": "es", "es_particles": 4, "meta_every": 2, "es_sigma": 0.5})
    run = build_run(cfg, data=data, teacher=build_model("cnn_teacher", 10, 1))
    with torch.no_grad():
        for p in run.trainer.meta.particles[1].bundle.net.parameters():  # particle 2 (the owner is particle 0)
            p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"ES particle 2: the student's loss became non-finite at step 1"):
        run.fit(progress=False)
