"""Data regimes (scarce and noisy labels, a small trusted quiz), the per-sample loss network, per-sample
locks, whole-split evaluation, and the benchmark's refusal to mix configs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lkd_ray.config import ConfigError, LossCfg, LossNetCfg, build_config
from lkd_ray.data import build_data
from lkd_ray.data.regimes import apply_label_noise, pairflip_target, regime_split
from lkd_ray.losses import SampleLossNet, build_lossnets, build_method, handcrafted
from lkd_ray.losses.learnable import LogitLossNet, SAMPLE_INPUTS, SAMPLE_OUTPUTS
from lkd_ray.losses.methods import StudentOutputs, TeacherOutputs

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- label noise and splits
@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_label_noise_flips_exactly_the_rate_of_every_class_seeded(kind):
    labels = np.repeat(np.arange(10), [300, 200, 100, 50, 400, 120, 80, 60, 90, 100])
    noisy = apply_label_noise(labels, 0.3, kind, 10, seed=5)
    flipped = noisy != labels
    for c in range(10):
        m = labels == c
        assert flipped[m].sum() == round(0.3 * m.sum())  # exactly the rate, per class
    if kind == "pairflip":  # the fixed confusion map c → c + 1
        assert np.array_equal(noisy[flipped], pairflip_target(labels[flipped], 10))
    else:  # a flipped label always lands on another class, spread over all of them
        assert np.all(noisy[flipped] != labels[flipped])
        assert len(np.unique(noisy[flipped & (labels == 0)])) == 9
    assert np.array_equal(apply_label_noise(labels, 0.3, kind, 10, seed=5), noisy)
    assert not np.array_equal(apply_label_noise(labels, 0.3, kind, 10, seed=6), noisy)
    assert np.array_equal(apply_label_noise(labels, 0.0, kind, 10, seed=5), labels)


def test_regime_split_keeps_quiz_clean_disjoint_and_the_teacher_on_the_whole_pool():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 10, 5000)
    sp = regime_split(clean, 10, 0.1, 3, label_noise=0.4, labels_per_class=20, quiz_per_class=15)
    assert len(sp.student) == 200 and np.all(np.bincount(sp.labels[sp.student], minlength=10) == 20)
    assert len(sp.quiz) == 150 and np.all(np.bincount(clean[sp.quiz], minlength=10) == 15)
    assert np.array_equal(sp.labels[sp.quiz], clean[sp.quiz])  # the trusted set keeps its clean labels
    assert not np.intersect1d(sp.quiz, sp.teacher).size and np.isin(sp.student, sp.teacher).all()
    assert sp.flipped[sp.teacher].mean() == pytest.approx(0.4, abs=0.01)
    full = regime_split(clean, 10, 0.1, 3)  # the teacher's pool does not depend on labels_per_class or the quiz size
    assert np.array_equal(full.teacher, sp.teacher)
    with pytest.raises(ValueError, match=r"quiz_per_class=60: class \d+ has only \d+ image\(s\) in the held-out split"):
        regime_split(clean, 10, 0.1, 3, quiz_per_class=60)


def test_config_checks_for_regimes():
    with pytest.raises(ConfigError, match="labels_per_class and data.train_subset"):
        build_config("fashion_mnist", overrides=["data.labels_per_class=10", "data.train_subset=100"])
    with pytest.raises(ConfigError, match="label_noise"):
        build_config("fashion_mnist", overrides=["data.label_noise=1.0"])
    with pytest.raises(ConfigError, match="noise_kind"):
        build_config("fashion_mnist", overrides=["data.noise_kind=random"])
    with pytest.raises(ConfigError, match="lossnet.base must be kd or dist, not none"):
        build_config("fashion_mnist", overrides=["loss.method=lkd", "lossnet.kind=sample", "lossnet.base=none"])
    cfg = build_config("fashion_mnist", overrides=["loss.method=lkd", "lossnet.kind=sample", "lossnet.base=dist"])
    assert build_lossnets(cfg.loss, cfg.lossnet).logit.base == "dist"
    with pytest.raises(ConfigError, match="sample_inputs"):
        build_config("fashion_mnist", overrides=["lossnet.kind=sample", "lossnet.sample_inputs=[pt_y, teacher_mood]"])


def test_fashion_regimes_build_the_right_sets_and_the_teacher_key_says_which(fashion_available, tmp_path):
    from lkd_ray.train.teacher import teacher_data, teacher_key

    full = build_config("fashion_mnist", run={"cache_dir": str(tmp_path)})
    scarce = build_config("fashion_mnist", data={"labels_per_class": 30, "quiz_per_class": 20, "batch_size": 32},
                          model={"teacher_batch_size": 128}, run={"cache_dir": str(tmp_path)})
    noisy = build_config("fashion_mnist", data={"label_noise": 0.4, "quiz_per_class": 50}, run={"cache_dir": str(tmp_path)})
    d_full, d_scarce, d_noisy = (build_data(c.data, 0, cache_dir=str(tmp_path)) for c in (full, scarce, noisy))
    assert (d_scarce.train_size, d_scarce.quiz_size) == (300, 200) and (d_noisy.train_size, d_noisy.quiz_size) == (54000, 500)
    assert teacher_data(scarce, d_scarce).train_size == 54000  # the teacher is unaffected by the student's scarcity ...
    assert teacher_key(scarce, d_scarce) == teacher_key(full, d_full)  # ... and is the very same teacher
    assert teacher_key(noisy, d_noisy) != teacher_key(full, d_full)  # noisy labels: a teacher of its own
    table = d_noisy.label_table()
    assert table["flipped"][~table["quiz"]].mean() == pytest.approx(0.4, abs=1e-3) and not table["flipped"][table["quiz"]].any()
    assert d_full.label_table() is None  # nothing changed: nothing to audit


def test_evaluation_covers_the_whole_quiz_split_in_order(fashion_available, tmp_path):
    """quiz_top1 is over every quiz image, every time (it used to be a random 98 %: a shuffled, drop_last loader)."""
    from lkd_ray.train import build_run

    cfg = build_config("fashion_mnist", data={"quiz_per_class": 13, "labels_per_class": 20, "batch_size": 32},
                       loss={"method": "ce"}, run={"cache_dir": str(tmp_path), "progress": False})
    data = build_data(cfg.data, 0)
    tr = build_run(cfg, data=data).trainer
    ids = np.concatenate([b.ids.numpy() for b in data.quiz_eval])
    assert np.array_equal(ids, data.quiz_indices) and len(ids) == 130
    x = torch.cat([b.x for b in data.quiz_eval])
    y = torch.cat([b.y for b in data.quiz_eval])
    with torch.no_grad():
        expect = 100.0 * (tr.bundle(x).logits.argmax(1) == y).double().mean().item()
    for _ in range(3):  # the same number every time: no random subset
        assert tr.evaluate()["quiz_top1"] == pytest.approx(expect, abs=1e-9)


def test_a_run_stores_its_noisy_labels_for_audit(fashion_available, tmp_path):
    import pyarrow.parquet as pq

    from lkd_ray.train import build_run

    cfg = build_config("fashion_mnist", data={"label_noise": 0.3, "noise_kind": "pairflip", "labels_per_class": 10, "batch_size": 32,
                                              "quiz_per_class": 10}, loss={"method": "ce"}, optim={"epochs": 1},
                       run={"cache_dir": str(tmp_path / "c"), "progress": False})
    build_run(cfg).fit(tmp_path / "run")
    t = pq.read_table(tmp_path / "run" / "labels.parquet").to_pydict()
    assert sum(t["student"]) == 100 and sum(t["quiz"]) == 100
    raw = build_data(cfg.data.model_copy(update={"label_noise": 0.0}), 0).regime
    lab, clean, ids = np.array(t["label"]), np.array(t["clean_label"]), np.array(t["id"])
    assert np.array_equal(clean, raw.clean[ids])
    flipped = lab != clean
    assert flipped.mean() > 0.25 and np.array_equal(lab[flipped], (clean[flipped] + 1) % 10)


# --------------------------------------------------------------------------- the per-sample loss network
@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(16, 10, generator=g, dtype=torch.float64) * 2, torch.randn(16, 10, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, 10, (16,), generator=g))


def _pearson_each_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair, by numpy's corrcoef (independent of the loss code)."""
    return torch.tensor([np.corrcoef(a[i].detach().numpy(), b[i].detach().numpy())[0, 1] for i in range(len(a))],
                        dtype=torch.float64)


@pytest.mark.parametrize("base", ["kd", "dist"])
@pytest.mark.parametrize("lock", ["none", "norm", "nontarget"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_per_sample_lossnet_is_its_base_at_init(logits, lock, ls, base):
    """Residual and zero-initialised: value and logit gradient are exactly w_ce·CE_ε + w_kd·KD_τ (or DIST_τ,β,γ)."""
    zs, zt, y = logits
    net = SampleLossNet(tau=3.0, w_ce=0.4, w_kd=1.7, label_smoothing=ls, lock=lock, trust=0.5, base=base,
                        dist_beta=2.0, dist_gamma=0.5).double()
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    val = net(z1, zt, y)
    distil = handcrafted.kd(z2, zt, 3.0) if base == "kd" else handcrafted.dist(z2, zt, 2.0, 0.5, 3.0)
    ref = 0.4 * handcrafted.ce(z2, y, ls) + 1.7 * distil
    assert val.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(val, z1)[0], torch.autograd.grad(ref, z2)[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("output", SAMPLE_OUTPUTS)
def test_each_per_sample_output_moves_only_what_it_names(logits, output):
    zs, zt, y = logits
    net = SampleLossNet(outputs=[output], tau=2.0).double()
    with torch.no_grad():
        net.last_layer.weight.normal_(0, 2.0)
    w = net.per_sample(zs, zt, y)
    base = {"w_ce": 1.0, "w_kd": 1.0, "tau": 2.0}
    for k, v in w.items():
        moved = not torch.allclose(v, torch.full_like(v, base[k]))
        assert moved == (k == output), k
    lo, hi = {"w_ce": (0, 2), "w_kd": (0, 2), "tau": (1.0, 4.0)}[output]  # 2σ(·) and τ·2^tanh(·)
    assert (w[output] > lo).all() and (w[output] < hi).all()
    # the value is the per-sample formula, computed independently here
    ce = torch.nn.functional.cross_entropy(zs, y, reduction="none")
    t = w["tau"][:, None]
    kd = (torch.softmax(zt / t, 1) * (torch.log_softmax(zt / t, 1) - torch.log_softmax(zs / t, 1))).sum(1) * w["tau"] ** 2
    assert net(zs, zt, y).item() == pytest.approx((w["w_ce"] * ce + w["w_kd"] * kd).mean().item(), rel=1e-10)


@pytest.mark.parametrize("output", SAMPLE_OUTPUTS)
def test_on_dist_each_output_acts_on_the_per_sample_inter_class_term_only(logits, output):
    """On DIST's base: the value is mean_i[a_i·CE_i] + β·mean_i[b_i·τ_i²·(1 − Pearson_i(τ_i))] + γ·τ²·(1 − mean
    intra-class Pearson), computed independently here; and the student's gradient holds a_i, b_i, τ_i fixed."""
    zs, zt, y = logits
    net = SampleLossNet(outputs=[output], tau=2.0, base="dist", dist_beta=1.5, dist_gamma=0.7).double()
    with torch.no_grad():
        net.last_layer.weight.normal_(0, 2.0)
    w = net.per_sample(zs, zt, y)
    ce = torch.nn.functional.cross_entropy(zs, y, reduction="none")

    def independent(z, a, b, t):
        t_ = t[:, None]
        inter = (1 - _pearson_each_row(torch.softmax(z / t_, 1), torch.softmax(zt / t_, 1))) * t**2
        ps, pt = torch.softmax(z / 2.0, 1), torch.softmax(zt / 2.0, 1)
        intra = 4.0 * (1 - _pearson_each_row(ps.t(), pt.t()).mean())
        return (a * torch.nn.functional.cross_entropy(z, y, reduction="none")).mean() + 1.5 * (b * inter).mean() + 0.7 * intra

    assert net(zs, zt, y).item() == pytest.approx(independent(zs, w["w_ce"], w["w_kd"], w["tau"]).item(), rel=1e-10)
    assert ce.shape == w["w_ce"].shape
    # the gradient: finite differences of the loss with the per-sample outputs frozen at their values here
    z = zs.clone().requires_grad_(True)
    g, = torch.autograd.grad(net(z, zt, y), z)
    a, b, t = (w[k].detach() for k in ("w_ce", "w_kd", "tau"))
    fd = torch.zeros_like(zs)
    for i, c in [(0, 0), (3, 7), (9, 2), (15, 9)]:
        zp, zm = zs.clone(), zs.clone()
        zp[i, c] += 1e-6
        zm[i, c] -= 1e-6
        fd[i, c] = (independent(zp, a, b, t) - independent(zm, a, b, t)) / 2e-6
        assert g[i, c].item() == pytest.approx(fd[i, c].item(), rel=1e-5, abs=1e-9), (i, c)
    assert g.sum(1).abs().max().item() < 1e-12


@pytest.mark.parametrize("lock", ["none", "norm"])
def test_the_per_sample_network_on_dist_is_gradchecked_through_a_two_step_unroll(lock):
    from lkd_ray.meta.gradcheck import run_gradcheck

    errs = run_gradcheck(eps=1e-4, unroll=2, max_entries=15, seed=6, kind="sample", base="dist", lock=lock)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("inp", SAMPLE_INPUTS)
def test_each_per_sample_input_matches_its_definition_and_is_gradchecked(logits, inp):
    from lkd_ray.meta.gradcheck import run_gradcheck

    zs, zt, y = logits
    v = SampleLossNet(inputs=[inp]).double().sample_features(zs, zt, y)[:, 0]
    ps, pt = torch.softmax(zs, 1), torch.softmax(zt, 1)
    logc = np.log(10)
    py = ps[torch.arange(16), y]
    other = ps.clone()
    other[torch.arange(16), y] = -1
    expect = {"pt_y": pt[torch.arange(16), y], "agree": (zt.argmax(1) == y).double(), "ce_s": -torch.log(py) / logc,
              "margin_s": py - other.max(1).values, "ent_s": -(ps * ps.log()).sum(1) / logc,
              "ent_t": -(pt * pt.log()).sum(1) / logc}[inp]
    torch.testing.assert_close(v, expect)
    errs = run_gradcheck(eps=1e-4, unroll=2, max_entries=15, seed=4, kind="sample", sample_inputs=[inp])
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("output", SAMPLE_OUTPUTS)
def test_each_per_sample_output_is_gradchecked(output):
    from lkd_ray.meta.gradcheck import run_gradcheck

    errs = run_gradcheck(eps=1e-4, unroll=2, max_entries=15, seed=5, kind="sample", sample_outputs=[output])
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("kind", ["class", "sample", "sample-dist"])
@pytest.mark.parametrize("lock", ["none", "norm", "nontarget"])
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_every_sample_s_logit_gradient_sums_to_zero_and_a_lock_keeps_its_scope(logits, kind, lock, scope):
    """No learned loss may push all logits of a sample up or down together (neither CE nor KD pulls that
    back); the norm lock bounds each sample (scope=sample) or the batch (scope=batch)."""
    zs, zt, y = logits
    if kind == "class":
        net = LogitLossNet(hidden=(8,), tau=2.0, lock=lock, trust=None, lock_scope=scope).double()
    else:
        net = SampleLossNet(hidden=(8,), tau=2.0, lock=lock, trust=None, lock_scope=scope,
                            base="dist" if kind == "sample-dist" else "kd").double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1.0)
    z = zs.clone().requires_grad_(True)
    g, = torch.autograd.grad(net(z, zt, y), z)
    assert g.sum(1).abs().max().item() < 1e-12
    zb = zs.clone().requires_grad_(True)
    distil = handcrafted.dist(zb, zt, 1.0, 1.0, 2.0) if kind == "sample-dist" else handcrafted.kd(zb, zt, 2.0)
    base = distil + (handcrafted.ce(zb, y) if kind != "class" else 0)
    gb, = torch.autograd.grad(base, zb)
    if lock == "none":
        assert not torch.allclose(g.norm(), gb.norm())
    elif scope == "sample":
        torch.testing.assert_close(g.norm(dim=1), gb.norm(dim=1))
    else:
        assert g.norm().item() == pytest.approx(gb.norm().item(), rel=1e-12)
        assert not torch.allclose(g.norm(dim=1), gb.norm(dim=1))  # samples traded size among themselves


def test_per_sample_method_owns_the_ce_term(logits):
    zs, zt, y = logits
    cfg = LossCfg(method="lkd", w_ce=0.3, w_logit=0.7, tau=2.0)
    nets = build_lossnets(cfg, LossNetCfg(kind="sample", hidden=[4])).double()
    total, parts = build_method(cfg, nets)(StudentOutputs(zs), TeacherOutputs(zt), y)
    assert set(parts) == {"lkd"}  # one term carries CE and KD: the network weighs both per sample
    ref = 0.3 * handcrafted.ce(zs, y) + 0.7 * handcrafted.kd(zs, zt, 2.0)
    assert total.item() == pytest.approx(ref.item(), rel=1e-12)


# --------------------------------------------------------------------------- the benchmark's records
def test_accuracy_benchmark_refuses_a_run_folder_of_another_config(tmp_path):
    out = tmp_path / "runs" / "full" / "kd-s0"
    out.mkdir(parents=True)
    other = build_config("fashion_mnist", loss={"method": "kd", "tau": 2.0}).to_dict()
    (out / "result.json").write_text(json.dumps({"config": other}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--regime", "full", "--methods", "kd",
                        "--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "holds a run of another config" in r.stderr and "loss.tau: 2.0 → 4.0" in r.stderr
    assert not (tmp_path / "res").exists()  # nothing ran, nothing recorded


def test_tuning_picks_on_quiz_never_on_test():
    from lkd_ray.search_spaces import HANDCRAFTED, pick, trials

    rows = [{"trial": "a", "quiz_top1": 80.0, "quiz_loss": 0.5, "test_top1": 99.0},
            {"trial": "b", "quiz_top1": 81.0, "quiz_loss": 0.6, "test_top1": 10.0},
            {"trial": "c", "quiz_top1": 81.0, "quiz_loss": 0.4, "test_top1": 11.0}]
    assert pick(rows)["trial"] == "c"
    unmeasured = [{"trial": "d", "quiz_top1": 81.0, "quiz_loss": None}, *rows]  # first in grid order, no quiz loss
    assert pick(unmeasured)["trial"] == "c"  # a missing quiz loss ranks after a measured one, never as 0
    assert pick(unmeasured[:1] + [{"trial": "e", "quiz_top1": 81.0, "quiz_loss": None}])["trial"] == "d"
    assert len(HANDCRAFTED["kd"]) == 16 and len(trials("handcrafted")) == 16 + 4 + 4 + 4 + 8 + 12  # dist-wce: τ × w_ce
    kd = {t.name: t.sections["loss"] for t in HANDCRAFTED["kd"]}
    assert kd["alpha=1,tau=8"] == {"method": "kd", "w_ce": 0.0, "w_logit": 1.0, "tau": 8.0}
    for t in trials("handcrafted"):  # every trial is a valid config
        build_config("fashion_mnist", **t.sections)
