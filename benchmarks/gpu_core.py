"""LKD's step cost over KD's on a GPU: the single-process core on random tensors, two published pairs.

resnet32x4 → resnet8x4 (CIFAR-100 shapes: 32×32, 100 classes, batch 64, fp32) and resnet34 →
resnet18 (ImageNet shapes: 224×224, 1000 classes, batch 128, bf16 + channels_last as the recipe).
Student batches live on the GPU already, so this times the method, not a data loader. KD and every
LKD setting are timed in interleaved repetitions; the ratio is taken per repetition and reported as
median and min–max. Each is timed eager and with the student step compiled (``torch.compile`` of the
student bundle: forward, loss and backward graphs); the meta-step stays eager — `higher` patches
modules at run time and differentiates through a differentiable optimizer step, which torch.compile
does not trace. Run it whenever a GPU is lent (about 8 minutes on an H100):

    python benchmarks/gpu_core.py                # writes benchmarks/results/gpu_core.json
    python benchmarks/gpu_core.py --smoke        # tiny shapes on any device: checks the script itself
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

from _util import write  # noqa: E402
from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data  # noqa: E402
from lkd_ray.models import build_model  # noqa: E402
from lkd_ray.data import Batch  # noqa: E402
from lkd_ray.train import build_run  # noqa: E402

PAIRS = {  # name → (recipe, teacher, student, classes, image size, batch, bf16 + channels_last)
    "resnet32x4->resnet8x4": ("cifar100", "resnet32x4", "resnet8x4", 100, 32, 64, False),
    "resnet34->resnet18": ("imagenet", "resnet34", "resnet18", 1000, 224, 128, True),
}
# "default" is the recipe's shipped LKD settings; the others override them
SETTINGS = [("default", {}), ("meta_every=1,scope=full", {"meta_every": 1, "scope": "full"}),
            ("meta_every=1,scope=head", {"meta_every": 1, "scope": "head"}),
            ("meta_every=10,scope=head", {"meta_every": 10, "scope": "head"}),
            ("meta_every=20,scope=full", {"meta_every": 20, "scope": "full"}),
            ("meta_every=64,scope=full", {"meta_every": 64, "scope": "full"}),
            ("meta_every=10,scope=full,backend=torch.func", {"meta_every": 10, "scope": "full", "backend": "torch.func"})]


def make_cfg(recipe: str, teacher: str, student: str, classes: int, size: int, batch: int, fast: bool, method: str, meta: dict):
    return build_config(recipe, model={"teacher": teacher, "student": student, "teacher_weights": "random"},
                        data={"dataset": "synthetic", "num_classes_override": classes, "image_size": size, "channels": 3,
                              "synthetic_size": max(2 * batch, 64), "batch_size": batch, "augment": False, "root": None,
                              "num_workers": 0},
                        loss={"method": method}, meta=meta,
                        run={"bf16": fast, "channels_last": fast, "progress": False, "device": "auto"})


def time_steps(cfg, teacher, data, x, y, steps: int, warmup: int, compile_backend: str | None = None) -> float:
    tr = build_run(cfg, data=data, teacher=teacher, teacher_info={"source": "random"}, log=lambda *_: None).trainer
    if compile_backend:
        tr.student = torch.compile(tr.student, backend=compile_backend)
    for _ in range(warmup):
        tr.train_step(Batch(x, y))
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(Batch(x, y))  # no host sync inside the step (the loop syncs every log_every steps)
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--steps", type=int, default=128, help="timed steps per setting and repetition (≥ 2 × the largest meta_every)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and step counts (CPU is fine); does not write results")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the compiled mode")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    records, per_pair = [], {}
    for name in args.pairs:
        recipe, t_name, s_name, classes, size, batch, fast = PAIRS[name]
        if args.smoke:
            size, batch, args.steps, args.warmup, args.reps = min(size, 32), 2, 2, 1, 1
        base = make_cfg(recipe, t_name, s_name, classes, size, batch, fast, "kd", {})
        data = build_data(base.data)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher = build_model(t_name, classes, 3).eval()
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, classes, (batch,), device=dev)
        for mode in args.modes:
            backend = args.compile_backend if mode == "compiled" else None
            kd_s: list[float] = []
            lkd_s: dict[str, list[float]] = {s: [] for s, _ in SETTINGS}
            for rep in range(args.reps):
                kd_s.append(time_steps(base, teacher, data, x, y, args.steps, args.warmup, backend))
                for sname, meta in SETTINGS:
                    cfg = make_cfg(recipe, t_name, s_name, classes, size, batch, fast, "lkd", meta)
                    lkd_s[sname].append(time_steps(cfg, teacher, data, x, y, args.steps, args.warmup, backend))
                print(f"{name} {mode} rep {rep}: kd {1e3 * kd_s[-1]:.1f} ms/step", flush=True)
            for sname, _ in SETTINGS:
                ratios = [a / b for a, b in zip(lkd_s[sname], kd_s)]
                records.append({"pair": name, "mode": mode, "config": sname, "lkd_over_kd": statistics.median(ratios),
                                "spread": [min(ratios), max(ratios)], "lkd_ms_per_step": [1e3 * t for t in lkd_s[sname]],
                                "kd_ms_per_step": [1e3 * t for t in kd_s]})
                print(f"{name:24} {mode:8} {sname:45} {records[-1]['lkd_over_kd']:.2f}x  "
                      f"(per-rep {min(ratios):.2f}–{max(ratios):.2f})")
            per_pair.setdefault(name, {})[f"kd_ms_per_step_{mode}"] = [1e3 * t for t in kd_s]
        d = base.meta
        per_pair[name].update({"batch": batch, "image_size": size, "bf16_channels_last": fast, "recipe": recipe,
                               "default_meta": {"meta_every": d.meta_every, "scope": d.scope, "backend": d.backend,
                                                "estimator": d.estimator}})
        if torch.cuda.is_available():
            per_pair[name]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    if not args.smoke:
        write("gpu_core.json", {"steps": args.steps, "reps": args.reps, "compile_backend": args.compile_backend,
                                "pairs": per_pair, "records": records})


if __name__ == "__main__":
    main()
