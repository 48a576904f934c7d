import pytest
import torch

from lkd_ray.models import MODEL_NAMES, TeacherLoadError, build_model, load_teacher

# Published parameter counts of the CIFAR-100 KD benchmark models (millions) and torchvision's.
PUBLISHED = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "resnet56": 0.86,
             "vgg8": 3.96, "vgg13": 9.46, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36, "ResNet50": 23.71}
IMAGENET = {"resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56, "mobilenet_v2": 3.50, "mobilenet_v1": 4.23}


def n_params(m):
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_cifar_parameter_counts(name, count):
    assert n_params(build_model(name, 100)) == pytest.approx(count, abs=0.006)


@pytest.mark.parametrize("name,count", IMAGENET.items())
def test_imagenet_parameter_counts(name, count):
    assert n_params(build_model(name, 1000)) == pytest.approx(count, abs=0.006)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ("ResNet50", "resnet50", "vgg19", "resnet110")])
def test_forward_is_head_of_features(name):
    torch.manual_seed(0)
    small = name.startswith("cnn")
    m = build_model(name, 7, 1 if small else 3).eval()
    x = torch.randn(2, 1 if small else 3, 28 if small else (64 if name in IMAGENET else 32), 28 if small else (64 if name in IMAGENET else 32))
    f = m.forward_features(x)
    assert f.ndim == 4 and f.shape[1] == m.feature_channels
    assert torch.equal(m(x), m.forward_head(f))
    assert m(x).shape == (2, 7)
    assert all(hasattr(m, h) for h in m.head_modules) and hasattr(m, m.feature_tap)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid models: .*resnet8x4"):
        build_model("resnet9000", 10)


def test_teacher_loads_community_checkpoint_layouts(tmp_path):
    src = build_model("resnet8", 10)
    sd = src.state_dict()
    for i, ckpt in enumerate([sd, {"model": sd, "epoch": 240}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}}]):
        path = tmp_path / f"t{i}.pth"
        torch.save(ckpt, path)
        t = load_teacher("resnet8", str(path), 10)
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        assert all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())
    t = load_teacher("resnet8", f"file://{tmp_path / 't0.pth'}", 10)
    assert torch.equal(t.fc.weight, sd["fc.weight"])


def test_teacher_class_mismatch_names_both_sides(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(build_model("resnet8", 100).state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"has 100 classes.*built for 10"):
        load_teacher("resnet8", str(path), 10)


def test_teacher_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(build_model("wrn_16_1", 10).state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"does not fit model 'resnet8'.*not a resnet8"):
        load_teacher("resnet8", str(path), 10)


def test_teacher_missing_file_and_pickles_refused(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("resnet8", str(tmp_path / "nope.pth"), 10)
    bad = tmp_path / "evil.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict(), "obj": object()}, bad)
    with pytest.raises(TeacherLoadError, match="cannot be read as weights"):
        load_teacher("resnet8", str(bad), 10)


def test_torchvision_weights_unknown_tag():
    with pytest.raises(TeacherLoadError, match="valid: IMAGENET1K_V1"):
        load_teacher("resnet18", "torchvision:NOPE", 1000)
    with pytest.raises(TeacherLoadError, match="publishes no weights"):
        load_teacher("mobilenet_v1", "torchvision", 1000)
