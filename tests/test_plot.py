"""`python -m lkd_ray plot`: the drawn curves against independent formulas, and the command end to end
from a real LKD run's loss-network versions on local disk and on S3 (moto_server)."""
import json
from pathlib import Path

import numpy as np
import torch

from lkd_ray.cli import main
from lkd_ray.config import build_config
from lkd_ray.data import build_data
from lkd_ray.losses.learnable import LogitLossNet
from lkd_ray.models import build_model
from lkd_ray.plot import _family_logits, _pair_logits, gradient_vs_kd, loss_and_target_grad
from lkd_ray.storage import open_storage
from lkd_ray.train import build_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_kd_reference_matches_closed_form():
    tau, C = 4.0, 10
    p_s = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    p_t = torch.tensor(0.7, dtype=torch.float64)
    loss, grad = loss_and_target_grad(None, p_s, p_t, C, tau)
    ps, pt = p_s.numpy(), 0.7
    qs, qt = (1 - ps) / (C - 1), (1 - pt) / (C - 1)
    kl = pt * np.log(pt / ps) + (C - 1) * qt * np.log(qt / qs)  # KL(teacher ‖ student) on the family
    np.testing.assert_allclose(loss.numpy(), tau**2 * kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), tau * (ps - pt), rtol=1e-10, atol=1e-12)  # τ²·(p_s−p_t)/τ


def test_family_logits_give_the_requested_probabilities():
    p = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    probs = torch.softmax(_family_logits(p, 5, 2.0) / 2.0, 1)
    torch.testing.assert_close(probs[:, 0], p)
    torch.testing.assert_close(probs[:, 1:], ((1 - p) / 4)[:, None].expand(-1, 4))


def test_learned_gradient_matches_finite_differences_and_starts_at_kd():
    tau, C = 4.0, 10
    net = LogitLossNet(tau=tau)
    p_s = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    p_t = torch.tensor(0.4, dtype=torch.float64)
    # zero-initialised last layer: the untrained network is KD exactly
    l0, g0 = loss_and_target_grad(net, p_s, p_t, C, tau)
    lk, gk = loss_and_target_grad(None, p_s, p_t, C, tau)
    torch.testing.assert_close(l0, lk)
    torch.testing.assert_close(g0, gk)
    torch.manual_seed(0)
    with torch.no_grad():
        net.g[-1].weight.normal_(0, 0.5)
    _, g = loss_and_target_grad(net, p_s, p_t, C, tau)
    assert (g - gk).abs().max() > 1e-3  # the residual really changes the gradient
    net64 = net.double()
    eps = 1e-6
    y = torch.zeros(1, dtype=torch.long)
    for i in range(len(p_s)):
        z_s = _family_logits(p_s[i:i + 1], C, tau)
        z_t = _family_logits(p_t.reshape(1), C, tau)
        e = torch.zeros_like(z_s)
        e[0, 0] = eps
        with torch.no_grad():
            fd = (net64(z_s + e, z_t, y) - net64(z_s - e, z_t, y)) / (2 * eps)
        assert abs(fd.item() - g[i].item()) <= 1e-6 * max(1.0, abs(fd.item())), (i, fd.item(), g[i].item())


def test_gradient_angle_to_kd_against_an_independent_computation():
    tau, C = 4.0, 10
    for lock in ("none", "norm"):
        net = LogitLossNet(tau=tau, lock=lock, trust=0.5)
        ang, ratio = gradient_vs_kd(net, tau, C, n=256)
        assert ang.max() < 1e-4 and (ratio - 1).abs().max() < 1e-9  # at init the learned loss is KD
    torch.manual_seed(1)
    net = LogitLossNet(tau=tau)
    with torch.no_grad():
        net.g[-1].weight.normal_(0, 0.5)
    ang, ratio = gradient_vs_kd(net, tau, C, n=256, batch=128)
    assert ang.median() > 1.0
    # example 3, by hand in numpy: KD's gradient is τ·(softmax(z_s/τ) − softmax(z_t/τ)) / batch (batchmean)
    z_s, z_t, y = _pair_logits(256, C)
    a = z_s[:128].clone().requires_grad_(True)
    g_l = torch.autograd.grad(net.double()(a, z_t[:128], y[:128]), a)[0][3].numpy()
    sm = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
    g_k = tau * (sm(z_s[3].numpy() / tau) - sm(z_t[3].numpy() / tau)) / 128
    cos = g_l @ g_k / np.linalg.norm(g_l) / np.linalg.norm(g_k)
    assert abs(np.degrees(np.arccos(cos)) - ang[3].item()) < 1e-6
    assert abs(np.linalg.norm(g_l) / np.linalg.norm(g_k) - ratio[3].item()) < 1e-9


def _run(method: str, out: Path, seed: int = 0) -> dict:
    cfg = build_config("fashion_mnist", data={"dataset": "synthetic", "synthetic_size": 256, "batch_size": 32, "image_size": 16},
                       optim={"epochs": 2}, loss={"method": method}, meta={"meta_every": 2, "lr": 0.05},
                       run={"progress": False, "seed": seed})
    data = build_data(cfg.data, seed)
    teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
    return build_run(cfg, data=data, teacher=teacher).fit(out, progress=False)


def test_plot_command_end_to_end_from_local_and_s3_storage(tmp_path, s3_bucket, moto_endpoint, capsys):
    run_dir = tmp_path / "runs" / "lkd-s0"
    res = _run("lkd", run_dir)
    versions = sorted(int(p.stem[1:]) for p in (run_dir / "lossnet").glob("v*.pt"))
    assert versions[0] == 0 and versions[-1] == res["meta"]["version"] and len(versions) == 3  # start + 2 epochs
    records = []
    for method, r in (("lkd", res), ("kd", _run("kd", tmp_path / "runs" / "kd-s0"))):
        records.append({"method": method, "seed": 0, "test_top1": r["test_top1"], "wall_s": r["wall_s"], "epochs": r["epochs"],
                        "quiz_top1": r["quiz_top1"],
                        "curve": [{k: h[k] for k in ("epoch", "quiz_top1", "test_top1")} for h in r["history"]]})
    acc = tmp_path / "accuracy.json"
    acc.write_text(json.dumps(records))
    # the same versions on S3, in the LossNetServer's layout <prefix>/<run>/lossnet/v<version>.pt
    st = open_storage(f"s3://{s3_bucket}/runs", moto_endpoint)
    for p in (run_dir / "lossnet").glob("v*.pt"):
        st.put_bytes(f"lkd-s3/lossnet/{p.name}", p.read_bytes())
    figs = tmp_path / "figs"
    rc = main(["plot", "--lossnet", str(run_dir), f"s3://{s3_bucket}/runs/lkd-s3", "--accuracy", str(acc), "--out", str(figs),
               "--endpoint-url", moto_endpoint, "--tag", "_x"])
    assert rc == 0
    names = sorted(p.name for p in figs.glob("*.png"))
    assert names == ["learned_grad_map_lkd-s0_x.png", "learned_grad_map_lkd-s3_x.png", "learned_loss_lkd-s0_x.png",
                     "learned_loss_lkd-s3_x.png", "learned_vs_kd_gradient_lkd-s0_x.png", "learned_vs_kd_gradient_lkd-s3_x.png",
                     "paired_vs_kd_x.png", "training_curves_x.png"]
    for n in names:
        data = (figs / n).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert not list(figs.glob(".*"))  # no temporary files left behind
    assert str(figs / "training_curves_x.png") in capsys.readouterr().out


def test_plot_errors_say_what_to_do(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", "--lossnet", str(empty), "--accuracy", "none", "--out", str(tmp_path / "f")]) == 2
    assert "no loss-network versions under" in capsys.readouterr().err
    assert main(["plot", "--lossnet", "--accuracy", str(tmp_path / "missing.json"), "--out", str(tmp_path / "f")]) == 2
    assert "run `python benchmarks/accuracy.py` first" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "records"}))
    assert main(["plot", "--lossnet", "--accuracy", str(bad), "--out", str(tmp_path / "f")]) == 2
    assert "not a list of accuracy records" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"method": "lkd-x", "seed": 0, "test_top1": 1.0, "curve": [{"epoch": 1, "quiz_top1": 1.0, "test_top1": 1.0}]}]))
    assert main(["plot", "--lossnet", "--accuracy", str(other), "--out", str(tmp_path / "f"), "--methods", "kd", "lkd"]) == 2
    assert "pass --methods all" in capsys.readouterr().err
    assert main(["plot", "--lossnet", "--accuracy", str(other), "--out", str(tmp_path / "f")]) == 0  # default: every method
    assert (tmp_path / "f" / "training_curves.png").is_file()
