"""Tune searches: over loss-network architectures (Optuna TPE + ASHA on quiz accuracy), or over the
hand-crafted losses with the grids the KD literature tunes them on (``--space handcrafted``: KD α × τ,
DKD β, DIST τ, label smoothing ε, WSL τ × weight; every trial runs to the end; the pick is named).

    python jobs/tune_lossnet.py --trials 16 --max-concurrent 4 --set optim.epochs=6
    python jobs/tune_lossnet.py --space handcrafted --set data.label_noise=0.4 --set data.quiz_per_class=50
    ray job submit --working-dir . -- python jobs/tune_lossnet.py --storage s3://bucket/lkd --use-gpu --trials 32
Writes trials.csv, trials.json and best_config.yaml (accepted unchanged by jobs/lkd_*.py --config)
to --out and to <storage>/<name>/. Re-running with the same --name resumes an interrupted search.
"""
from _common import build, outage_bound, parser

from lkd_ray.errors import user_errors

from lkd_ray.distributed.launch import LaunchOptions
from lkd_ray.distributed.tune import TuneOptions, format_table, run_search


def main(argv=None) -> int:
    p = parser(__doc__, "fashion_mnist")
    p.add_argument("--name", default="tune-lossnet", help="search name (storage prefix); reuse it to resume")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA: epochs every trial gets before it can be stopped")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (with --use-gpu: per worker)")
    p.add_argument("--out", default=None, help="local folder for the results (default runs/<name>)")
    p.add_argument("--space", choices=["lossnet", "handcrafted"], default="lossnet",
                   help="lossnet: loss-network architectures (LKD); handcrafted: the hand-crafted losses' grids")
    p.add_argument("--families", nargs="+", choices=["kd", "dkd", "dist", "ls", "wsl"],
                   help="handcrafted: only these families (default: all)")
    args = p.parse_args(argv)
    cfg = build(args, {"loss": {"method": "lkd"}, "run": {"progress": False}})
    with user_errors(args.debug):
        launch = LaunchOptions(storage=args.storage, num_workers=args.num_workers, use_gpu=args.use_gpu,
                               endpoint_url=args.endpoint_url, mode=args.mode, max_failures=args.max_failures,
                               cpus_per_worker=args.cpus_per_worker, storage_outage_s=outage_bound(args))
        res = run_search(cfg, launch, TuneOptions(trials=args.trials, max_concurrent=args.max_concurrent,
                                                  grace_epochs=args.grace_epochs, name=args.name,
                                                  gpus_per_trial=args.gpus_per_trial, space=args.space,
                                                  families=args.families),
                         args.out or f"runs/{args.name}")
    print(format_table(res["rows"]))
    picked = f" (picked: {res['best_params']['trial']})" if args.space == "handcrafted" else ""
    print(f"\nbest quiz top-1 {res['best_metric']}{picked}; best config: {res['out_dir']}/best_config.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
