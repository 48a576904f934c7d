"""The embedded default: KD vs LKD through Ray on one machine — local Ray, local storage, offline
Fashion-MNIST, a teacher trained once and cached.

    python jobs/lkd_fashion.py                       # what `./dev run` runs
    ray job submit --working-dir . -- python jobs/lkd_fashion.py --num-workers 2
    python jobs/lkd_fashion.py --preset noisy-sym40  # the loss the regimes benchmark picked there (BENCHMARKS.md)
"""
from _common import PRESETS, build, dump, launch, parser, smoke_overrides, summarize


def main(argv=None) -> int:
    p = parser(__doc__, "fashion_mnist")
    p.add_argument("--methods", nargs="+", default=None, choices=["ce", "kd", "dkd", "dist", "wsl", "lkd", "control"],
                   help="default: kd lkd; with --preset, the preset's own method (add kd to compare)")
    args = p.parse_args(argv)
    methods = args.methods or ([PRESETS[args.preset]["sections"]["loss"]["method"]] if args.preset else ["kd", "lkd"])
    cfgs = []
    for method in methods:  # validate every config before any cluster work
        cfg = build(args, {"loss": {"method": method}}, smoke_overrides(10, 28, 1))
        cfg.run.name = f"{cfg.run.name}-{method}"
        cfgs.append(cfg)
    results = [launch(cfg, args) for cfg in cfgs]
    print()
    t = results[0].get("teacher") or {}
    if t.get("test_top1") is not None:
        print(f"teacher {cfgs[0].model.teacher}: test top-1 {t['test_top1']:.2f}%")
    for res in results:
        print(summarize(res))
        if args.json:
            dump(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
