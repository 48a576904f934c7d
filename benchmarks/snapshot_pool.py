"""SnapshotPool draw latency against a raw boto3 GET of the same object, on a real S3 endpoint
(moto_server, 127.0.0.1):

* cold: no object-store copy and no loader cache — every draw is fetched from storage, sha256-verified
  and deserialised by a loader actor;
* warm: the draw is served from Ray's object store (the copy the index put there when it was recorded);
* prefetched: what a meta-step waits for when the draw was requested right after the previous one and
  a (simulated) training interval passed in between — the stall;
* memory: snapshots recorded past ``object_bytes`` leave the object store (bounded as configured).

    .venv/bin/python benchmarks/snapshot_pool.py [--model resnet8x4] [--reps 20]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import boto3  # noqa: E402
import ray  # noqa: E402

from _util import moto_server, summary, write  # noqa: E402
from lkd_ray.distributed.snapshot_pool import RaySnapshotStore, start_snapshot_pool  # noqa: E402
from lkd_ray.models import build_model  # noqa: E402
from lkd_ray.train.snapshots import cpu_state  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet8x4")
    ap.add_argument("--reps", type=int, default=100, help="draws per path (≥ 100 for a p99)")
    ap.add_argument("--train-ms", type=float, default=300.0, help="simulated training time between draws (prefetch case)")
    ap.add_argument("--jobs-beside", type=int, default=0, help="other jobs running on the machine meanwhile (recorded)")
    args = ap.parse_args()
    from records import load_1m, now

    started, load0 = now(), load_1m()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        uri = "s3://bench/pool"
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        state = cpu_state(build_model(args.model, 100))
        rows = {}
        # one snapshot only, so every draw is the same object as the raw GET
        index, loaders = start_snapshot_pool(uri, "one", "uniform", 0, num_loaders=1, cache_bytes=0, endpoint_url=endpoint,
                                             namespace_name="cold", object_bytes=0)
        store = RaySnapshotStore(uri, "one", index, loaders, record=True, endpoint_url=endpoint, prefetch=False)
        store.record(1, state)
        store.flush()  # recording is asynchronous: stored and indexed now
        key = "pool/one/snapshots/1.pt"
        size = s3.head_object(Bucket="bench", Key=key)["ContentLength"]
        raw = []
        for _ in range(args.reps):
            t = time.perf_counter()
            s3.get_object(Bucket="bench", Key=key)["Body"].read()
            raw.append(time.perf_counter() - t)
        rows["raw_boto3_get"] = summary(raw)
        cold = []
        for _ in range(args.reps):  # cache_bytes=0: every draw fetches, verifies and deserialises
            t = time.perf_counter()
            store.sample()
            cold.append(time.perf_counter() - t)
        rows["pool_cold"] = summary(cold)
        wi, wl = start_snapshot_pool(uri, "warm", "uniform", 0, num_loaders=1, cache_bytes=0, endpoint_url=endpoint,
                                     namespace_name="warm")
        warm_store = RaySnapshotStore(uri, "warm", wi, wl, record=True, endpoint_url=endpoint, prefetch=False)
        warm_store.record(1, state)
        warm_store.flush()
        warm_store.sample()
        warm = []
        for _ in range(args.reps):
            t = time.perf_counter()
            warm_store.sample()
            warm.append(time.perf_counter() - t)
        rows["pool_warm"] = summary(warm)
        assert warm_store.stats()["from_storage"] == 0, warm_store.stats()
        pi, pl = start_snapshot_pool(uri, "pre", "uniform", 0, num_loaders=1, cache_bytes=0, endpoint_url=endpoint,
                                     namespace_name="pre")
        pre_store = RaySnapshotStore(uri, "pre", pi, pl, record=True, endpoint_url=endpoint, prefetch=True)
        for step in range(1, 5):
            pre_store.record(step, state)
        pre_store.flush()
        pre_store.sample()
        pre = []
        for _ in range(args.reps):
            time.sleep(args.train_ms / 1e3)  # the worker trains while the next draw is fetched
            t = time.perf_counter()
            pre_store.sample()
            pre.append(time.perf_counter() - t)
        rows["pool_prefetched"] = summary(pre)
        mi, ml = start_snapshot_pool(uri, "mem", "uniform", 0, num_loaders=1, cache_bytes=0, endpoint_url=endpoint,
                                     namespace_name="mem", object_bytes=3 * size + 1)
        mem_store = RaySnapshotStore(uri, "mem", mi, ml, record=True, endpoint_url=endpoint)
        for step in range(1, 9):
            mem_store.record(step, state)
        mem_store.flush()
        memory = ray.get(mi.stats.remote())
        ray.shutdown()
    ms = {k: {kk: (vv * 1e3 if kk != "n" and vv is not None else vv) for kk, vv in v.items()} for k, v in rows.items()}
    for k, v in ms.items():
        print(f"{k:16} p50 {v['p50']:8.2f} ms  p99 {v['p99'] if v['p99'] is None else round(v['p99'], 2)} ms  (n={v['n']})")
    print(f"memory: {memory['object_store_snapshots']} of 8 snapshots in the object store, "
          f"{memory['object_store_bytes']} of {memory['object_store_limit']} bytes allowed")
    path = write("snapshot_pool.json", {"model": args.model, "object_bytes": size, "train_ms": args.train_ms, "latency_ms": ms,
                                        "ratio_to_raw_get_p50": {k: v["p50"] / ms["raw_boto3_get"]["p50"] for k, v in ms.items()},
                                        "memory": {k: memory[k] for k in ("object_store_snapshots", "object_store_bytes",
                                                                          "object_store_limit")},
                                        "targets": {"warm_p50_ms": 5.0, "prefetched_p99_ms": 0.0, "cold_over_raw_get": 1.2}},
                 jobs_beside=args.jobs_beside, started=started, load_start=load0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
