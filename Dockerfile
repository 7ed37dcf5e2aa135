# syntax=docker/dockerfile:1
# The image k8s/base/job.yaml runs: nvp-dist with CUDA torch and DeepSpeed, as an unprivileged user.
#   docker build -t registry.example.com/nvp-dist:0.1.0 .
# torch's Linux wheels on PyPI carry the CUDA runtime libraries (as pip dependencies), so the node's
# NVIDIA driver, mounted by the device plugin, is the only GPU software the host provides. DeepSpeed needs
# no CUDA toolkit here: the trainer uses torch's Adam and no JIT-compiled ops.
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

# torch alone in a layer: most of the image's size, and the part that changes least. Pinned as in
# launch/setup_env.sh.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /opt/nvp-dist
COPY pyproject.toml README.md ./
COPY nvp_dist ./nvp_dist
# A regular install, not an editable one: the root filesystem is read-only when the pods run.
RUN pip install --no-cache-dir .
# What the Job's command runs from its workingDir: launch/train.py (and the configs for other runs).
COPY launch ./launch
COPY configs ./configs

USER 1000:1000
ENTRYPOINT ["tini", "-g", "--"]
CMD ["nvp-dist", "--help"]
