# syntax=docker/dockerfile:1
# The image k8s/base/job.yaml runs: nvp-dist with CUDA torch and DeepSpeed, as an unprivileged user, every
# Python package at the version constraints.txt pins (the versions CI tests).
#   docker build -t registry.example.com/nvp-dist:0.1.0 .   [--build-arg TORCH_CUDA=cu126|cu128|cu130]
# Not a CUDA base image, on purpose: torch's CUDA wheels carry the CUDA runtime, cuBLAS, cuDNN and NCCL as
# pip dependencies, and Triton (torch.compile's GPU code generator) ships its own ptxas, so the node's
# NVIDIA driver, mounted by the device plugin, is the only GPU software the host provides (the driver must
# support TORCH_CUDA: cu128 needs >= 570.26; README, "GPUs"). Nothing the trainer runs is compiled with
# nvcc: Adam is torch's fused kernel and DeepSpeed's JIT ops stay off. An image for DeepSpeed's CUDA ops
# (its FusedAdam, offloaded optimisers) would start from an nvidia/cuda -devel image instead, about 4 GB more.
FROM python:3.11-slim-bookworm

# tini runs as PID 1 and forwards SIGTERM to the launcher's whole process group (see k8s/base/job.yaml).
# Unpinned: the base image's tag fixes the Debian release, and Debian replaces pinned versions on updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# The uid and gid of k8s/base/job.yaml's securityContext.
RUN groupadd --gid 1000 nvp \
 && useradd --uid 1000 --gid nvp --create-home --home-dir /home/nvp nvp

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv

WORKDIR /opt/nvp-dist
COPY constraints.txt ./
# torch alone in a layer: most of the image's size, and the part that changes least. Its version is
# constraints.txt's, its CUDA build TORCH_CUDA's, from PyTorch's index for that build.
ARG TORCH_CUDA=cu128
RUN torch_version="$(sed -n 's/^torch==//p' constraints.txt)" \
 && pip install --no-cache-dir -c constraints.txt "torch==${torch_version}+${TORCH_CUDA}" \
      --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# The dependencies in their own layer, before the code: a change to nvp_dist rebuilds only the layers below.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY nvp_dist ./nvp_dist
# A regular install, not an editable one: the root filesystem is read-only when the pods run.
RUN pip install --no-cache-dir --no-deps .
# What the Job's command runs from its workingDir: launch/train.py (and the configs for other runs).
COPY launch ./launch
COPY configs ./configs

USER 1000:1000
ENTRYPOINT ["tini", "-g", "--"]
CMD ["nvp-dist", "--help"]
