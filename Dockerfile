# syntax=docker/dockerfile:1.7
# Two images from one file (see docs/DEPLOYMENT.md):
#   docker build --target api    -t realcustom-api .     HTTP front end: no torch, no CUDA
#   docker build --target worker -t realcustom-worker .  CUDA runtime, torch (CUDA), TensorRT
# Bases are pinned by tag; pin by digest with --build-arg CUDA_IMAGE=nvidia/cuda@sha256:...
# TensorRT engines are never baked in: they depend on the GPU, so workers build them at
# start-up (or a job does) into the /artifacts volume, keyed by GPU and build settings.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.7

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The API never downloads anything: the tokenizer is built from files in the image.
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app

# Only what the API process imports (checked by tests/deploy: the API imports no torch).
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install --no-cache-dir -r /tmp/requirements-api.txt \
    # open-clip is used for its CLIP vocabulary file only; its torch dependency is not wanted.
    && pip install --no-cache-dir --no-deps open-clip-torch==3.3.0

COPY pyproject.toml README.md ./
COPY realcustom ./realcustom
COPY engines ./engines
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --user-group --no-create-home app

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint.sh

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["api"]

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker

ARG PYTHON_VERSION=3.11.14
# torch's CUDA build must match the base image's CUDA major version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TENSORRT_PACKAGE=tensorrt-cu13==10.13.3.9

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    # The root filesystem may be read-only (it is in k8s/): caches go to the artifacts volume.
    XDG_CACHE_HOME=/artifacts/cache \
    MODEL=tiny \
    BACKEND=eager

COPY --from=uv /uv /usr/local/bin/uv

# The CUDA base ships no Python 3.11: uv installs a standalone build (no apt, no PPA).
RUN uv python install ${PYTHON_VERSION} \
    && uv venv --python ${PYTHON_VERSION} ${VIRTUAL_ENV}

# Heavy, rarely changing layers first: torch (CUDA) and TensorRT (NVIDIA's index).
RUN uv pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION} \
    && uv pip install --extra-index-url https://pypi.nvidia.com ${TENSORRT_PACKAGE}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY realcustom ./realcustom
COPY engines ./engines
COPY service ./service
# torch is already satisfied by the CUDA build above (2.13.0+cu130 matches ==2.13.0).
RUN uv pip install . \
    && uv pip install --no-deps open-clip-torch==3.3.0 \
    && useradd --system --uid 10001 --user-group --create-home app \
    && install -d -o 10001 -g 10001 /artifacts /models \
    # The engines cache defaults to ./artifacts: make that the volume.
    && ln -s /artifacts /app/artifacts

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint.sh
COPY --chmod=0644 docker/worker_ready.py /usr/local/lib/realcustom/worker_ready.py

USER 10001:10001
VOLUME ["/artifacts"]
# Healthy = model loaded and warm (engine builds on a new GPU type can take many minutes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "/usr/local/lib/realcustom/worker_ready.py"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["worker"]
