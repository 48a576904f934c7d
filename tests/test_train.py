"""End-to-end single-process runs on real Fashion-MNIST and on generated data."""
import json

import pytest
import torch

from lkd_ray.config import build_config
from lkd_ray.data import build_data
from lkd_ray.models import build_model
from lkd_ray.train import Trainer, TrainingDiverged
from lkd_ray.train.teacher import prepare_teacher


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
    assert info["test_top1"] > 70.0  # 2 short epochs; chance is 10 %
    cfg = cfg.model_copy(deep=True)
    cfg.meta.meta_every = 8
    cfg.meta.snapshot_every = 25
    cfg.meta.p_snapshot = 0.5
    trainer = Trainer(cfg, teacher, data, out_dir=tmp_path)
    phi0 = [p.detach().clone() for p in trainer.lossnets.parameters()]
    res = trainer.fit()
    assert res["test_top1"] > 50.0, res["test_top1"]  # chance is 10 %
    moved = [not torch.equal(a, b) for a, b in zip(phi0, trainer.lossnets.parameters())]
    assert all(moved), "every loss-network tensor should move under meta-gradients"
    steps = res["steps"]
    assert res["meta"]["accepted"] == steps // 8 and res["meta"]["rejected_nonfinite"] == 0
    assert res["meta"]["from_snapshot"] > 0
    assert len(trainer.snapshots) == steps // 25
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test_top1"] == res["test_top1"] and saved["epochs"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "quiz_top1" in json.loads(lines[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_teacher_cache_is_reused(fashion_setup):
    cfg, data, _, info = fashion_setup
    msgs = []
    _, info2 = prepare_teacher(cfg, data, log=msgs.append)
    assert info2 == info and "cached" in msgs[0]


def _synthetic(**over):
    cfg = build_config("fashion_mnist", data={"dataset": "synthetic", "synthetic_size": 256, "batch_size": 32, "channels": 1,
                                              "image_size": 16}, optim={"epochs": 1}, run={"progress": False}, **over)
    return cfg, build_data(cfg.data)


def test_teacher_student_class_mismatch_is_clear():
    cfg, data = _synthetic()
    with pytest.raises(ValueError, match=r"teacher cnn_teacher predicts 7 classes but the data set synthetic has 10"):
        Trainer(cfg, build_model("cnn_teacher", 7, 1), data)


def test_nan_meta_gradient_is_rejected_and_training_goes_on():
    cfg, data = _synthetic(meta={"meta_every": 2, "p_snapshot": 0.0})
    data.quiz.images[:] = float("nan")  # every quiz loss, hence every meta-gradient, is NaN
    trainer = Trainer(cfg, build_model("cnn_teacher", 10, 1), data)
    phi0 = [p.detach().clone() for p in trainer.lossnets.parameters()]
    res = trainer.fit()
    assert res["meta"]["rejected_nonfinite"] == res["steps"] // 2 > 0 and res["meta"]["accepted"] == 0
    assert all(torch.equal(a, b) for a, b in zip(phi0, trainer.lossnets.parameters()))


def test_diverging_student_stops_with_advice():
    cfg, data = _synthetic(loss={"method": "kd"})
    data.train.images[:] = float("inf")
    with pytest.raises(TrainingDiverged, match="lower optim.lr"):
        Trainer(cfg, build_model("cnn_teacher", 10, 1), data).fit()


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "dist", "lkd"])
def test_every_method_runs_through_one_loop_with_features(method, tmp_path):
    cfg, data = _synthetic(loss={"method": method, "w_feat": 0.5}, meta={"meta_every": 3, "scope": "head"})
    teacher = build_model("cnn_teacher", 10, 1)
    trainer = Trainer(cfg, teacher, data, out_dir=tmp_path)
    res = trainer.fit()
    assert res["epochs"] == 1 and res["test_top1"] is not None
    assert (trainer.bundle.connector is not None)
    # checkpoints are weights-only loadable and restore exactly
    path = tmp_path / "ckpt.pt"
    torch.save(trainer.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    other = Trainer(cfg, teacher, data, log=False)
    other.load_state_dict(sd)
    assert other.state.step == trainer.state.step
    for a, b in zip(trainer.bundle.parameters(), other.bundle.parameters()):
        assert torch.equal(a, b)
    if method == "lkd":
        for a, b in zip(trainer.lossnets.parameters(), other.lossnets.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("schedule,expected_ratio", [("constant", 1.0), ("student", 0.5)])
def test_meta_lr_follows_the_student_schedule_when_asked(schedule, expected_ratio):
    # cosine over 2 epochs: the student's lr in epoch 2 is lr0·(1 + cos(π/2))/2 = lr0/2
    cfg = build_config("fashion_mnist", data={"dataset": "synthetic", "synthetic_size": 256, "batch_size": 32, "image_size": 16},
                       optim={"epochs": 2, "schedule": "cosine"}, run={"progress": False},
                       meta={"meta_every": 2, "p_snapshot": 0.0, "lr_schedule": schedule})
    data = build_data(cfg.data)
    teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
    tr = Trainer(cfg, teacher, data, log=False)
    res = tr.fit()
    assert res["meta"]["accepted"] > 0
    assert tr.meta_optimizer.adam.param_groups[0]["lr"] == pytest.approx(cfg.meta.lr * expected_ratio)
