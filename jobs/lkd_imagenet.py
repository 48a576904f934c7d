"""LKD on ImageNet (the KD benchmark's recipe): R34→R18 or R50→MobileNetV1.

    ray job submit --working-dir . -- python jobs/lkd_imagenet.py --data /data/imagenet \\
        --storage s3://bucket/lkd --num-workers 8 --use-gpu
    python jobs/lkd_imagenet.py --smoke               # generated 224×224 data, 1000 classes: checks the pipeline

Data: an ImageFolder root with train/ and val/ on every node (--data), or Parquet shards written by
jobs/prepare_imagenet.py to S3 and streamed through Ray Data with decoding on CPU workers (--parquet). Teacher: torchvision weights by default, or
--teacher-weights PATH|URI (state dict at the top level or under model/state_dict).
"""
from _common import build, parser, run_and_report, smoke_overrides

PAIRS = {"r34-r18": ("resnet34", "resnet18", "torchvision:IMAGENET1K_V1"),
         "r50-mbv1": ("resnet50", "mobilenet_v1", "torchvision:IMAGENET1K_V1")}


def main(argv=None) -> int:
    p = parser(__doc__, "imagenet")
    p.add_argument("--pair", choices=sorted(PAIRS), default="r34-r18")
    p.add_argument("--data", help="ImageNet root (ImageFolder layout: train/, val/) on every node")
    p.add_argument("--parquet", help="Parquet shards from jobs/prepare_imagenet.py (path or s3://…), streamed through Ray Data")
    p.add_argument("--teacher-weights", help="override the teacher's weights (path, URI or torchvision[:TAG])")
    p.add_argument("--method", default="lkd", choices=["ce", "kd", "dkd", "dist", "lkd"])
    args = p.parse_args(argv)
    teacher, student, weights = PAIRS[args.pair]
    extra = {"model": {"teacher": teacher, "student": student, "teacher_weights": args.teacher_weights or weights},
             "loss": {"method": args.method}, "run": {"name": f"imagenet-{args.pair}-{args.method}"}}
    if args.data and args.parquet:
        p.error("give --data (ImageFolder) or --parquet (shards), not both")
    if args.data:
        extra["data"] = {"root": args.data}
    if args.parquet:
        extra["data"] = {"dataset": "parquet", "root": args.parquet, "endpoint_url": args.endpoint_url}
    cfg = build(args, extra, smoke_overrides(1000, 224) | {"run": {"name": f"smoke-imagenet-{args.pair}", "bf16": False,
                                                                    "channels_last": False, "progress": False}})
    return run_and_report(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
