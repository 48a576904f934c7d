import pytest

from lkd_ray.config import RECIPES, ConfigError, build_config, parse_override


def test_unknown_field_lists_valid_fields():
    with pytest.raises(ConfigError, match=r"unknown field 'meta.scop'; valid fields here: estimator, backend, quiz_objective, scope"):
        build_config("fashion_mnist", overrides=["meta.scop=head"])
    with pytest.raises(ConfigError, match=r"unknown field 'metaa'.*valid fields here: model, data, optim"):
        build_config("fashion_mnist", overrides=["metaa.scope=head"])


def test_unknown_value_lists_valid_values():
    with pytest.raises(ConfigError, match=r"loss.method: Input should be 'ce', 'kd', 'dkd', 'dist', 'wsl', 'lkd' or 'control'"):
        build_config("fashion_mnist", overrides=["loss.method=fitnet"])
    with pytest.raises(ConfigError, match=r"valid models: .*resnet8x4"):
        build_config("fashion_mnist", overrides=["model.student=resnet9"])
    with pytest.raises(ConfigError, match="valid recipes: cifar100, fashion_mnist, imagenet|valid recipes: fashion_mnist, cifar100, imagenet"):
        build_config("mnist")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200])
def test_run_names_cannot_escape_their_prefix(name):
    with pytest.raises(ConfigError, match="run name"):
        build_config("fashion_mnist", run={"name": name})


def test_recipes_validate_and_overrides_apply(tmp_path):
    for r in RECIPES:
        cfg = build_config(r, data={"root": str(tmp_path)})
        assert cfg.optim.epochs >= 1
    cfg = build_config("cifar100", data={"root": str(tmp_path)})
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.data.batch_size, cfg.optim.weight_decay) == (0.05, [150, 180, 210], 64, 5e-4)
    f = tmp_path / "c.yaml"
    f.write_text("meta:\n  scope: head\n  meta_every: 5\n")
    cfg = build_config("fashion_mnist", f, ["meta.meta_every=7", "lossnet.hidden=[4, 4]"])
    assert (cfg.meta.scope, cfg.meta.meta_every, cfg.lossnet.hidden) == ("head", 7, [4, 4])
    assert parse_override("a.b=1.5") == {"a": {"b": 1.5}}


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.root is required for cifar100"):
        build_config("cifar100")
    with pytest.raises(ConfigError, match="needs milestones"):
        build_config("fashion_mnist", optim={"schedule": "multistep"})
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("fashion_mnist", "/nonexistent.yaml")


def test_cli_config_error_exits_2_before_work(capsys):
    from lkd_ray.cli import main

    assert main(["train", "--set", "meta.backend=jax"]) == 2
    assert "meta.backend" in capsys.readouterr().err


def test_new_fields_are_checked_together_before_any_work():
    with pytest.raises(ConfigError, match="teacher_cache caches the teacher's logits only"):
        build_config("fashion_mnist", model={"teacher_cache": True}, loss={"w_feat": 0.5})
    with pytest.raises(ConfigError, match="implemented for the in-memory data sets"):
        build_config("cifar100", data={"root": "/x"}, model={"teacher_cache": True})
    with pytest.raises(ConfigError, match="lossnet.frozen=true without lossnet.init_from"):
        build_config("fashion_mnist", lossnet={"frozen": True})
    with pytest.raises(ConfigError, match="es_particles must be even"):
        build_config("fashion_mnist", meta={"estimator": "es", "es_particles": 3})
    with pytest.raises(ConfigError, match="meta.estimator"):
        build_config("fashion_mnist", meta={"estimator": "hyper"})
    with pytest.raises(ConfigError, match="lossnet.lock"):
        build_config("fashion_mnist", lossnet={"lock": "size"})


def test_a_scale_lock_needs_a_base_loss():
    with pytest.raises(ConfigError, match="lossnet.lock=norm keeps the base loss's gradient norm"):
        build_config("fashion_mnist", loss={"method": "lkd"}, lossnet={"base": "none", "lock": "norm"})
    assert build_config("fashion_mnist", loss={"method": "lkd"}, lossnet={"base": "none", "lock": "none"}).lossnet.base == "none"


def test_a_per_sample_weight_on_a_zero_term_is_refused_and_the_grid_never_builds_one():
    """A per-sample CE (KD) weight multiplies loss.w_ce (w_logit): on a term of weight 0 it has no gradient and stays
    at its initial value (noisy-sym40's first per-sample grid ran so). The config refuses it; the grid avoids it."""
    from lkd_ray.search_spaces import HANDCRAFTED, lkd_sample_trials

    with pytest.raises(ConfigError, match=r"w_ce, a per-sample multiplier on loss.w_ce \(the CE term\), which is 0"):
        build_config("fashion_mnist", loss={"method": "lkd", "w_ce": 0.0}, lossnet={"kind": "sample"})
    with pytest.raises(ConfigError, match="w_kd"):
        build_config("fashion_mnist", loss={"method": "lkd", "w_logit": 0.0}, lossnet={"kind": "sample"})
    ok = build_config("fashion_mnist", loss={"method": "lkd", "w_ce": 0.0},
                      lossnet={"kind": "sample", "sample_outputs": ["w_kd", "tau"]})
    assert ok.loss.w_ce == 0.0  # dropping the dead output is the other way out
    for base in HANDCRAFTED["kd"]:  # every KD pick, α = 1 (w_ce = 0) included
        for t in lkd_sample_trials(base):
            cfg = build_config("fashion_mnist", **t.sections)
            assert cfg.loss.w_ce > 0 and cfg.loss.w_logit > 0 and cfg.loss.tau == base.sections["loss"]["tau"]


def test_the_per_sample_grid_on_dist_keeps_dist_s_pick_and_stays_within_the_cost_bar():
    """Eight trials, like the per-sample grid on KD: each on the tuned DIST's τ with CE and DIST at weight 1 (the DIST
    method's), the network over DIST's term, and a meta-step at most every 40 student steps (the cost cap)."""
    from lkd_ray.losses import build_lossnets
    from lkd_ray.search_spaces import HANDCRAFTED, lkd_sample_dist_trials

    for base in HANDCRAFTED["dist"]:
        trials = lkd_sample_dist_trials(base)
        assert len(trials) == 8 and len({t.name for t in trials}) == 8
        for t in trials:
            cfg = build_config("fashion_mnist", **t.sections)
            assert (cfg.loss.method, cfg.lossnet.kind, cfg.lossnet.base) == ("lkd", "sample", "dist")
            assert cfg.loss.w_ce == cfg.loss.w_logit == 1.0 and cfg.loss.tau == base.sections["loss"]["tau"]
            assert cfg.meta.meta_every >= 40
            net = build_lossnets(cfg.loss, cfg.lossnet).logit
            assert net.base == "dist" and (net.dist_beta, net.dist_gamma) == (cfg.loss.dist_beta, cfg.loss.dist_gamma)


def test_paths_handed_to_workers_are_absolute_where_they_exist_here_and_left_alone_otherwise(tmp_path, monkeypatch):
    import os

    from lkd_ray.config import build_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.npy").write_bytes(b"x")
    (tmp_path / "trusted.csv").write_text("index,label\n")
    cfg = build_config("fashion_mnist", overrides=["data.noisy_labels=labels.npy", "data.trusted=trusted.csv",
                                                   "lossnet.init_from=s3://bucket/run", "data.root=not/here"])
    out = with_absolute_paths(cfg)
    assert out.data.noisy_labels == str(tmp_path / "labels.npy") and out.data.trusted == str(tmp_path / "trusted.csv")
    assert out.lossnet.init_from == "s3://bucket/run" and out.data.root == "not/here"  # a URI; a path for another machine
    assert os.path.isabs(out.run.cache_dir)
    assert cfg.data.noisy_labels == "labels.npy"  # the user's config is not changed


@pytest.mark.parametrize("field", ["data.quiz_batch_size", "meta.unroll_batch_size"])
def test_a_meta_step_batch_of_no_images_is_refused_by_name(field):
    with pytest.raises(ConfigError, match=rf"{field}: Input should be greater than or equal to 1"):
        build_config("fashion_mnist", overrides=[f"{field}=0"])
    section, name = field.split(".")
    assert getattr(getattr(build_config("fashion_mnist", overrides=[f"{field}=16"]), section), name) == 16
