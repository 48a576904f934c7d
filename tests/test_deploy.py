"""Deployment files: the launcher YAML against Ray's schema, KubeRay manifests against the CRD
schemas (strict: unknown fields are errors), the Dockerfile against pyproject, and every path,
image and entrypoint they name against this repository."""
import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"


def launcher_config():
    return yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())


def test_launcher_yaml_passes_rays_schema_and_a_typo_does_not():
    from ray.autoscaler._private.util import validate_config

    cfg = launcher_config()
    validate_config(cfg)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["worker.gpu.a10g"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_launcher_yaml_is_autoscaling_secure_and_keyless():
    cfg = launcher_config()
    text = (ROOT / "cluster" / "aws-gpu.yaml").read_text()
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in workers.values())
    assert any("gpu" in v["node_config"]["InstanceType"] or v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    assert all("IamInstanceProfile" in v["node_config"] for v in cfg["available_node_types"].values())
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_TOKEN=\"$(" in head  # read from a secret at start, not written here
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    for script in re.findall(r"/home/lkd/app/(\S+\.py)", text):  # paths inside the image = repo paths
        assert (ROOT / script).is_file(), script


def _strict(schema):
    """Forbid unknown fields wherever the CRD lists properties (what kubectl --validate=strict does)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for k, v in schema.items():
            if k == "properties":
                for sub in v.values():
                    _strict(sub)
            elif isinstance(v, (dict, list)):
                _strict(v)
    elif isinstance(schema, list):
        for x in schema:
            _strict(x)
    return schema


def _crd_validator(kind_file: str):
    if not SCHEMAS.is_dir():
        pytest.skip("../shared/schemas is absent (a user's clone without the workspace's shared folder): no CRD schemas to check against")
    crd = yaml.safe_load((SCHEMAS / kind_file).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(schema)))


def rayjob():
    return yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())


def test_rayjob_passes_the_crd_schema_strictly_and_typos_fail():
    v = _crd_validator("ray.io_rayjobs.yaml")
    job = rayjob()
    assert [e.message for e in v.iter_errors(job)] == []
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # misspelled field
    assert any("rayStartParam" in e.message for e in v.iter_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "open"
    assert list(v.iter_errors(bad))


def test_rayjob_runs_the_imagenet_job_with_token_auth_and_a_gpu_group():
    job = rayjob()
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file() and argv[1] == "jobs/lkd_imagenet.py"
    import subprocess
    import sys

    helped = subprocess.run([sys.executable, argv[1], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--pair" in helped.stdout
    for flag in [a for a in argv if a.startswith("--")]:
        assert flag in helped.stdout, flag  # every flag the manifest passes exists
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = [g for g in cluster["workerGroupSpecs"] if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu)
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert images == {launcher_config()["docker"]["image"]}  # the one image the Dockerfile builds
    assert cluster["rayVersion"].startswith("2.60")


def test_dockerfile_matches_pyproject_and_is_pinned_nonroot():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r'"((?:torch|torchvision|higher)==[^"]+)"', pyproject):
        assert f'"{pin}"' in text, pin
    assert re.search(r'"ray\[default,tune,train\]==2\.60\.\*"', text) and '"ray[default,tune,train]==2.60.*"' in pyproject
    assert re.search(r"^USER\s+(?!root)\S+", text, re.M)
    for src in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    # layer order for caching: dependencies before the code
    assert text.index("COPY pyproject.toml") < text.index("pip install \"torch") < text.index("COPY lkd_ray")
    image = launcher_config()["docker"]["image"]
    assert image.split(":")[1] in (ROOT / "cluster" / "README.md").read_text() and f"docker build -t {image}" in text
