"""LKD on CIFAR-100 with the KD benchmark's recipe and teacher/student pairs.

    python jobs/lkd_cifar.py --pair resnet32x4-resnet8x4 --data /data/cifar100 \\
        --teacher-weights /ckpt/resnet32x4_vanilla/ckpt_epoch_240.pth
    python jobs/lkd_cifar.py --smoke

Teachers come from the community's checkpoint files (state dict at the top level or under model).
MobileNetV2/ShuffleNet students use lr 0.01, as the benchmark does.
"""
from _common import build, parser, run_and_report, smoke_overrides

PAIRS = ["resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1",
         "vgg13-vgg8", "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "ResNet50-MobileNetV2", "vgg13-MobileNetV2",
         "wrn_40_2-ShuffleV1", "ResNet50-vgg8"]
LOW_LR = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


def main(argv=None) -> int:
    p = parser(__doc__, "cifar100")
    p.add_argument("--pair", choices=PAIRS, default="resnet32x4-resnet8x4")
    p.add_argument("--data", help="CIFAR-100 root (torchvision layout)")
    p.add_argument("--teacher-weights", help="teacher checkpoint path or URI")
    p.add_argument("--method", default="lkd", choices=["ce", "kd", "dkd", "dist", "lkd"])
    args = p.parse_args(argv)
    teacher, student = args.pair.split("-", 1)
    extra = {"model": {"teacher": teacher, "student": student}, "loss": {"method": args.method},
             "run": {"name": f"cifar100-{args.pair}-{args.method}"}}
    if student in LOW_LR:
        extra["optim"] = {"lr": 0.01}
    if args.data:
        extra["data"] = {"root": args.data}
    if args.teacher_weights:
        extra["model"]["teacher_weights"] = args.teacher_weights
    elif not args.smoke:
        p.error("--teacher-weights is required (a CIFAR-100 teacher checkpoint); or use --smoke")
    cfg = build(args, extra, smoke_overrides(100, 32) | {"run": {"name": f"smoke-cifar-{args.pair}", "progress": False}})
    return run_and_report(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
