"""LossNetServer throughput and latency, next to a naive actor that only receives the same message.

* **sync**: real Ray Train ranks (2, 4, 8 workers on gloo) run the worker's own ``RemoteMetaUpdater``:
  all-reduce of the meta-gradient over the Train process group, one submission by the leader, the
  new φ broadcast back. Measured on rank 0 per round; one row per rank count (``clients`` = ranks).
* **async**: 2 … 64 clients in the driver, each the shipped ``RemoteMetaUpdater`` in async mode — fire and
  forget: ``submit`` returns without waiting, finished calls are collected later. Reported: what the client
  sees per ``submit`` (latency), and what the server got through per second (accepted + rejected, from the
  first submission until the last was answered), with its accepted/rejected/duplicate counts, which add up to
  the submissions (``uncounted`` 0, checked on both sides).
* **naive**: the same clients firing the same message at an actor whose method only receives it (the floor
  of one Ray actor call), the same way (fire and forget, collected at the end).

Percentiles come only from ≥ 100 samples (``p99`` is null otherwise).

    .venv/bin/python benchmarks/lossnet_server.py [--rounds 100] [--ranks 2 4 8] [--clients 2 8 32 64]
"""
from __future__ import annotations

import argparse
import json
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
from lkd_ray.losses import build_lossnets  # noqa: E402


@ray.remote(num_cpus=0)
class NaiveReceiver:
    """The floor: an actor method that takes the message and returns."""

    def submit(self, sender, round_, grad, base_version, lr_scale=1.0, from_snapshot=0, quiz_loss=None):
        return {"accepted": True}


def _row(mode: str, clients: int, lats: list[float], wall: float, n: int, extra: dict | None = None) -> dict:
    return {"mode": mode, "clients": clients, "submissions": n, "wall_s": wall, "throughput_per_s": n / wall,
            "latency_ms": {k: (v * 1e3 if k != "n" else v) for k, v in summary(lats).items()}, **(extra or {})}


def sync_rounds(ranks: int, rounds: int, cfg, store: str) -> dict:
    """Rounds of the real sync protocol inside a TorchTrainer with ``ranks`` workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"bench-sync-{ranks}"
    server = LossNetServer.options(name=name).remote(cfg, store, name, "sync", 4)
    ray.get(server.ping.remote())

    def loop(config):
        import ray.train
        import torch.distributed as dist

        from lkd_ray.distributed.meta_client import RemoteMetaUpdater
        from lkd_ray.losses import build_lossnets

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        nets = build_lossnets(config["cfg"].loss, config["cfg"].lossnet)
        up = RemoteMetaUpdater(ray.get_actor(config["name"]), rank, world, "sync", nets, sender="bench")
        n = sum(p.numel() for p in nets.parameters())
        g = torch.randn(n) * 1e-3
        lat, ar = [], []
        for r in range(config["rounds"] + 5):
            dist.barrier()
            t = time.perf_counter()
            up.submit(g)
            dt = time.perf_counter() - t
            t2 = time.perf_counter()
            buf = g.clone()
            dist.all_reduce(buf)  # what a round costs without the server: the all-reduce alone
            ar_dt = time.perf_counter() - t2
            if r >= 5:  # warm-up rounds out
                lat.append(dt)
                ar.append(ar_dt)
        if rank == 0:  # Train V2 keeps only checkpointed metrics in the Result: hand them over in a file
            with open(config["out"], "w") as f:
                json.dump({"lat": lat, "allreduce": ar}, f)
        ray.train.report({})

    out = os.path.join(store, f"{name}.json")
    trainer = TorchTrainer(loop, train_loop_config={"cfg": cfg, "name": name, "rounds": rounds, "out": out},
                           scaling_config=ScalingConfig(num_workers=ranks, resources_per_worker={"CPU": min(1.0, 1.8 / ranks)}),
                           run_config=RunConfig(name=name, storage_path=store))
    t0 = time.perf_counter()
    res = trainer.fit()
    wall = time.perf_counter() - t0
    rep = ray.get(server.report.remote())
    ray.kill(server)
    if res.error:
        raise RuntimeError(f"the sync benchmark's TorchTrainer failed: {res.error}")
    with open(out) as f:
        m = json.load(f)
    lat, ar = m["lat"], m["allreduce"]
    row = _row("sync", ranks, lat, sum(lat), len(lat), {
        "rounds_per_s": len(lat) / sum(lat), "versions": rep["version"], "server_submissions": rep["submitted"],
        "allreduce_ms": {k: (v * 1e3 if k != "n" else v) for k, v in summary(ar).items()}, "job_wall_s": wall})
    row["added_latency_ms_p50"] = row["latency_ms"]["p50"] - row["allreduce_ms"]["p50"]
    return row


def tally(rep: dict, clients: list[dict]) -> dict:
    """Every submission counted once, on the server and by the clients: accepted + rejected + duplicates (true
    replays; 0 in a run without restarts) + errors (client side) = submitted; ``uncounted`` is what is left over."""
    server = {k: rep[k] for k in ("submitted", "accepted", "rejected", "duplicates")}
    client = {k: sum(c[k] for c in clients) for k in ("submitted", "accepted", "rejected", "duplicates", "errors")}
    server["uncounted"] = server["submitted"] - server["accepted"] - server["rejected"] - server["duplicates"]
    client["uncounted"] = client["submitted"] - sum(client[k] for k in ("accepted", "rejected", "duplicates", "errors"))
    return {**server, "client_counted": client}


def async_clients(clients: int, rounds: int, cfg, store: str, naive: bool) -> dict:
    """``clients`` fire-and-forget clients, ``rounds`` submissions each: the shipped async client, or the same calls
    at the naive actor."""
    from lkd_ray.distributed.meta_client import RemoteMetaUpdater

    name = f"bench-{'naive' if naive else 'async'}-{clients}"
    actor = NaiveReceiver.remote() if naive else LossNetServer.options(name=name).remote(cfg, store, name, "async", 10**9)
    n = sum(p.numel() for p in build_lossnets(cfg.loss, cfg.lossnet).parameters())
    grad = torch.randn(n) * 1e-3

    def client(i: int) -> tuple[list[float], dict]:
        lat = []
        if naive:
            refs = []
            for r in range(rounds):
                t = time.perf_counter()
                refs.append(actor.submit.remote(f"c{i}", r, grad, 0))
                lat.append(time.perf_counter() - t)
            ray.get(refs)
            return lat, {}
        up = RemoteMetaUpdater(actor, i, clients, "async", build_lossnets(cfg.loss, cfg.lossnet), sender=f"c{i}")
        for _ in range(rounds):
            t = time.perf_counter()
            up.submit(grad)
            lat.append(time.perf_counter() - t)
        up.flush()  # every call answered and counted
        return lat, up.client_counters()

    ray.get(actor.ping.remote()) if not naive else ray.get(actor.submit.remote("warm", 0, grad, 0))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        out = list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lats = [x for lst, _ in out for x in lst]
    extra = {}
    if not naive:
        rep = ray.get(actor.report.remote())
        done = rep["accepted"] + rep["rejected"]
        extra = {"versions": rep["version"], "batches": rep["batches"], "processed_per_s": done / wall,
                 "mean_batch": rep["accepted"] / max(rep["batches"], 1), **tally(rep, [c for _, c in out])}
        if extra["uncounted"] or extra["client_counted"]["uncounted"]:
            print(f"WARNING: async clients={clients}: submissions neither accepted, rejected nor duplicates: server "
                  f"{extra['uncounted']}, clients {extra['client_counted']['uncounted']}", flush=True)
    ray.kill(actor)
    row = _row("naive" if naive else "async", clients, lats, wall, clients * rounds, extra)
    row["submit_latency_ms"] = row.pop("latency_ms")  # what the client waits in submit (fire and forget)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100, help="per client (sync: rounds; ≥ 100 for a p99)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32, 64])
    ap.add_argument("--jobs-beside", type=int, default=0, help="other jobs running on the machine meanwhile (recorded)")
    args = ap.parse_args()
    from records import load_1m, now

    started, load0 = now(), load_1m()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = build_config("fashion_mnist")
    n_params = sum(p.numel() for p in build_lossnets(cfg.loss, cfg.lossnet).parameters())
    rows = []
    with tempfile.TemporaryDirectory() as store:
        for ranks in args.ranks:
            rows.append(sync_rounds(ranks, args.rounds, cfg, store))
        for c in args.clients:
            for naive in (True, False):  # side by side, naive first
                rows.append(async_clients(c, args.rounds, cfg, store, naive))
    for r in rows:
        lat = r.get("latency_ms") or r["submit_latency_ms"]
        p99 = f"{lat['p99']:7.2f}" if lat["p99"] is not None else "   n/a"
        extra = (f"  all-reduce p50 {r['allreduce_ms']['p50']:.2f} ms, added {r['added_latency_ms_p50']:.2f} ms"
                 if r["mode"] == "sync" else f"  processed {r['processed_per_s']:.0f}/s" if r["mode"] == "async" else "")
        print(f"{r['mode']:5} clients={r['clients']:3d}  {r['throughput_per_s']:8.1f}/s  p50 {lat['p50']:7.2f} ms  "
              f"p99 {p99} ms{extra}", flush=True)
    path = write("lossnet_server.json", {"lossnet_params": n_params, "rounds": args.rounds, "rows": rows},
                 jobs_beside=args.jobs_beside, started=started, load_start=load0, configs=[cfg.to_dict()])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
