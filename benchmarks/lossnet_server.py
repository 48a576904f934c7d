"""LossNetServer throughput and submit latency (p50/p99) with 2–64 simulated clients.

Clients are driver threads, each a rank submitting meta-gradients of the default loss network
through Ray; sync mode closes a round when every rank has reported (a submit returns when its
round is applied), async mode applies each arrival.

    .venv/bin/python benchmarks/lossnet_server.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ray  # noqa: E402
import torch  # noqa: E402

from _util import summary, write  # noqa: E402
from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.distributed.lossnet_server import LossNetServer  # noqa: E402


def run(clients: int, mode: str, rounds: int, cfg, store: str) -> dict:
    server = LossNetServer.remote(cfg.to_dict(), store, f"bench-{mode}-{clients}", clients, mode, 10**9, 0)
    ray.get(server.ping.remote())
    shapes = [p.shape for p in ray.get(server.get.remote())[1].values()]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    grads_ref = ray.put(grads)

    def client(rank: int) -> list[float]:
        lat = []
        for r in range(rounds):
            t = time.perf_counter()
            ray.get(server.submit.remote(rank, r, grads_ref, 0))
            lat.append(time.perf_counter() - t)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        lats = [x for lst in ex.map(client, range(clients)) for x in lst]
    wall = time.perf_counter() - t0
    rep = ray.get(server.report.remote())
    ray.kill(server)
    return {"clients": clients, "mode": mode, "submissions": clients * rounds, "wall_s": wall,
            "throughput_per_s": clients * rounds / wall, "latency_ms": {k: (v * 1e3 if k not in ("n",) else v) for k, v in summary(lats).items()},
            "versions": rep["version"], "accepted": rep["accepted"], "rejected": rep["rejected"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = build_config("fashion_mnist")
    n_params = sum(p.numel() for p in __import__("lkd_ray.losses", fromlist=["x"]).build_lossnets(cfg.loss, cfg.lossnet).parameters())
    rows = []
    with tempfile.TemporaryDirectory() as store:
        for mode in ("sync", "async"):
            for c in args.clients:
                row = run(c, mode, args.rounds, cfg, store)
                rows.append(row)
                lat = row["latency_ms"]
                print(f"{mode:5} clients={c:3d}  {row['throughput_per_s']:8.1f} submits/s  p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms  "
                      f"versions {row['versions']}", flush=True)
    path = write("lossnet_server.json", {"lossnet_params": n_params, "rounds": args.rounds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
