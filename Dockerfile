# lkd_ray image: the cluster's image (cluster/aws-gpu.yaml, cluster/kuberay-rayjob.yaml) and a
# `ray job` runtime. CUDA-capable through torch's own CUDA wheels (cu130 build of torch 2.14.1),
# so the base needs only the NVIDIA driver from the host (nvidia-container-toolkit).
#   docker build -t lkd-ray:0.1.0 .
# Layers go from rarely to often changing: OS packages, pinned Python dependencies, then the code.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# rsync/openssh: the Ray cluster launcher syncs files and runs commands over SSH;
# dataset-fashion-mnist: the offline default job works inside the image too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client rsync curl ca-certificates dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 lkd
WORKDIR /home/lkd/app

# Dependencies first (cached until pyproject.toml changes). Versions match pyproject.toml exactly.
COPY pyproject.toml README.md ./
RUN pip install "torch==2.14.1" "torchvision==0.29.1" \
 && pip install "higher==0.2.1" "ray[default,tune,train]==2.60.*" "pyarrow>=14" "boto3>=1.34" "pydantic>=2.6,<3" \
        "pyyaml>=6" "tqdm>=4.66" "tensorboard>=2.15" "matplotlib>=3.8" "numpy>=1.26" "optuna>=3.6"

# The code last: edits rebuild only this layer.
COPY lkd_ray ./lkd_ray
COPY jobs ./jobs
COPY cluster ./cluster
RUN pip install --no-deps -e . && chown -R lkd:lkd /home/lkd

USER lkd
CMD ["python", "jobs/lkd_fashion.py", "--help"]
