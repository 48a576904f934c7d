"""Tune every loss family of ``lkd_ray.search_spaces`` on your data with Ray Tune and ship the pick: the same
command as ``python -m lkd_ray auto``, for ``ray job submit`` (trials spread over the cluster's workers).

    ray job submit --working-dir . -- python jobs/auto_loss.py --storage s3://bucket/lkd --name my-data \\
        --config my_data.yaml --epochs 6 --trials 4 --max-concurrent 8 --gpus-per-trial 0.5
Writes best_config.yaml, trials.csv/json, pick.json, summary.txt and figures to <storage>/<name>/; re-run with the
same --name to resume (finished trials are not run again). Bad input exits 2 (storage: 3) before any trial.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/x.py` from a checkout / ray working_dir

from lkd_ray.auto_plan import add_arguments  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    from lkd_ray.distributed.auto import main as auto_main

    return auto_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
