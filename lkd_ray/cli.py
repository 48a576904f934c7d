"""Command line: ``python -m lkd_ray {train,demo,gradcheck,plot,auto}``. Bad input (config, data, teacher, ...) exits
2 before any work, storage 3, with one line (``lkd_ray.errors``); ``--debug`` shows the traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, RECIPES, build_config, save_config
from .errors import user_errors


def _add_config_args(p: argparse.ArgumentParser, default_recipe: str = "fashion_mnist") -> None:
    p.add_argument("--recipe", default=default_recipe, choices=sorted(RECIPES), help="base recipe")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="loss settings tuned for a data regime (BENCHMARKS.md, 'Regimes'); applied before --config/--set")
    p.add_argument("--config", help="YAML file with sections model/data/optim/loss/lossnet/meta/run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. --set meta.scope=head (repeatable)")
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a reported failure (bad input exits 2, storage 3)")


def cmd_train(args) -> int:
    cfg = build_config(args.recipe, args.config, args.overrides, preset=args.preset)
    return _train_one(cfg, args.out)


def _train_one(cfg, out: str | None) -> int:
    from .train import build_run
    from .train.inputs import check_inputs

    out_dir = Path(out or Path(cfg.run.out_dir) / cfg.run.name)
    check_inputs(cfg)  # before a teacher is trained or anything is written to out_dir
    run = build_run(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    res = run.fit(out_dir)
    print(json.dumps({k: res[k] for k in ("method", "test_top1", "test_top5", "quiz_top1", "wall_s")}
                     | {"teacher": {k: v for k, v in run.teacher_info.items() if k not in ("curve", "recipe")}}, default=float))
    return 0


def cmd_demo(args) -> int:
    """Teacher once (cached), then KD and LKD students on the same recipe; prints both."""
    from .data import build_data
    from .train import build_run
    from .train.inputs import check_inputs

    base = build_config(args.recipe, args.config, args.overrides, preset=args.preset)
    check_inputs(base)
    data = build_data(base.data, base.run.seed, cache_dir=base.run.cache_dir)
    rows = []
    info = {}
    for method in ("kd", "lkd"):
        cfg = base.model_copy(deep=True)
        cfg.loss.method = method
        cfg.run.name = f"{base.run.name}-{method}"
        out_dir = Path(cfg.run.out_dir) / cfg.run.name
        run = build_run(cfg, data=data)
        info = run.teacher_info
        rows.append((method, run.fit(out_dir)))
    print(f"\nteacher {base.model.teacher}: test top-1 {info.get('test_top1', float('nan')):.2f}%")
    for method, res in rows:
        print(f"{method:>4}: student {res['student']} test top-1 {res['test_top1']:.2f}%  top-5 {res['test_top5']:.2f}%  "
              f"({res['wall_s']:.0f}s; results in {Path(base.run.out_dir) / (base.run.name + '-' + method)})")
    return 0


def cmd_gradcheck(args) -> int:
    import torch

    from .meta.gradcheck import run_gradcheck

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    worst = 0.0
    for scope in args.scope:
        for kind in args.kind:
            for lock in args.lock:
                errs = run_gradcheck(eps=args.eps, scope=scope, unroll=args.unroll, seed=args.seed, lock=lock, kind=kind)
                for backend, e in errs.items():
                    ok = e <= args.tol
                    worst = max(worst, e)
                    print(f"scope={scope:<4} kind={kind:<6} lock={lock:<9} unroll={args.unroll} backend={backend:<10} "
                          f"max relative error {e:.3e}  {'OK' if ok else 'FAIL'}")
    if worst > args.tol:
        print(f"gradcheck FAILED: max relative error {worst:.3e} > {args.tol:g}", file=sys.stderr)
        return 1
    print(f"gradcheck passed (tolerance {args.tol:g})")
    return 0


def cmd_plot(args) -> int:
    from .plot import make_figures

    paths = make_figures(args.lossnet, None if args.accuracy == "none" else args.accuracy, args.out,
                         args.endpoint_url, args.max_versions, None if args.methods == ["all"] else args.methods, args.tag)
    for p in paths:
        print(p)
    return 0


def cmd_example_labels(args) -> int:
    """Label files to try the noisy-label path (``auto``, ``train``) before bringing one's own."""
    from .data import load_fashion_mnist
    from .data.label_files import load_noisy_labels, write_example_labels

    clean = load_fashion_mnist(args.root, args.cache_dir)["train"][1]
    labels, trusted = write_example_labels(args.out, clean, 10, args.noise, args.trusted_per_class, args.seed)
    n_flip = int((load_noisy_labels(labels, len(clean), 10) != clean).sum())  # read back as auto will read it
    print(f"{labels}: {len(clean)} Fashion-MNIST training labels, {n_flip} of them wrong ({100 * n_flip / len(clean):.1f} %), "
          f"CIFAR-N layout (key worse_label)\n{trusted}: {args.trusted_per_class} clean images per class (index,label)")
    print(f"try: python -m lkd_ray auto --name my-labels --set data.noisy_labels={labels} "
          f"--set data.trusted={trusted} --set data.train_subset=8000")
    return 0


def cmd_auto(args) -> int:
    from .distributed.auto import main as auto_main

    return auto_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkd_ray", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train one student with one method (single process)")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default run.out_dir/run.name)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="teacher once (cached), then KD vs LKD on the offline recipe")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("gradcheck", help="meta-gradients of both backends vs float64 finite differences")
    p.add_argument("--scope", nargs="+", default=["full", "head"], choices=["full", "head"])
    p.add_argument("--unroll", type=int, default=2, help="unrolled steps")
    p.add_argument("--lock", nargs="+", default=["none", "norm", "nontarget"], choices=["none", "norm", "nontarget"])
    p.add_argument("--kind", nargs="+", default=["class", "sample"], choices=["class", "sample"],
                   help="loss-network kind: per (sample, class) residual, or per-sample weights and temperature")
    p.add_argument("--eps", type=float, default=1e-4)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gradcheck)
    p = sub.add_parser("plot", help="figures: the learned logit loss vs KD over training, and every method's training curves")
    p.add_argument("--lossnet", nargs="*", default=[], metavar="RUN_URI",
                   help="run locations holding lossnet/v<version>.pt (local path or s3://bucket/prefix/run)")
    p.add_argument("--accuracy", default="none",
                   help="records written by benchmarks/accuracy.py for the training curves ('none': skip them); the "
                        "benchmark's own figures are drawn by `python -m benchmarks.report`")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--max-versions", type=int, default=5, help="loss-network versions drawn per run (evenly spaced)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// locations")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help="methods drawn in the training curves ('all': every method in the records)")
    p.add_argument("--tag", default="", help="suffix for the figure files")
    _add_debug(p)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("example-labels", help="write a noisy label file and a trusted subset (Fashion-MNIST) to try "
                                                "the noisy-label path with")
    p.add_argument("--out", default="my_labels", help="folder for user_labels.pt and user_trusted.csv")
    p.add_argument("--noise", type=float, default=0.25, help="fraction of labels redrawn from a peaked confusion matrix")
    p.add_argument("--trusted-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the Debian package's, then the cache)")
    p.add_argument("--cache-dir", default=".cache/lkd_ray")
    _add_debug(p)
    p.set_defaults(func=cmd_example_labels)
    p = sub.add_parser("auto", help="tune every loss family on your data with Ray Tune and ship the quiz pick")
    from .auto_plan import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_auto)
    args = parser.parse_args(argv)
    try:
        with user_errors(getattr(args, "debug", False)):
            return args.func(args)
    except SystemExit as e:  # a reported failure: its exit code
        return e.code
