# syntax=docker/dockerfile:1.7
# Two images from one file (see docs/DEPLOYMENT.md, "Images"):
#   make docker-build (or docker build --target api|worker with docker/base-images.env as --build-arg)
# - api: the HTTP front end, no torch, no CUDA: its venv from docker/requirements-api.lock.
# - worker: a CUDA -base image (driver interface only) with a venv from
#   docker/requirements-worker.lock, whose torch wheel (CUDA 13) brings the CUDA libraries as pip
#   packages, plus TensorRT from NVIDIA's index.
# Each image is built in a builder stage (uv, caches) and copied into a clean runtime stage. Every
# PyPI package is installed from a lock with hashes (--require-hashes); the bases are pinned by
# digest through the ARGs (docker/base-images.env, `make docker-pin`).
# TensorRT engines are never baked in: they depend on the GPU, so the engine-build Job (or a
# worker) builds them into the /artifacts volume, keyed by GPU and build settings.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.7

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api-build

ENV UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY docker/requirements-api.lock docker/requirements-nodeps.lock docker/
# Only what the API process imports (checked by tests/deploy: the API imports no torch); open-clip
# for its CLIP vocabulary file only, without its torch dependency.
RUN uv venv /opt/venv --python /usr/local/bin/python3 \
    && uv pip install --require-hashes -r docker/requirements-api.lock \
    && uv pip install --require-hashes --no-deps -r docker/requirements-nodeps.lock
COPY pyproject.toml README.md ./
COPY realcustom ./realcustom
COPY engines ./engines
COPY service ./service
RUN uv pip install --no-deps .

FROM ${PYTHON_IMAGE} AS api

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:${PATH} \
    # The API never downloads anything: the tokenizer is built from files in the image.
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    HOST=0.0.0.0 \
    PORT=8000
RUN useradd --system --uid 10001 --user-group --no-create-home app
COPY --from=api-build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint.sh
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["api"]

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker-build

ARG PYTHON_VERSION=3.11.14
# TensorRT for CUDA 13, from NVIDIA's index (its PyPI package is a stub that downloads from
# there at install time): pinned by version, the one install without hashes (docs/DEPLOYMENT.md).
ARG TENSORRT_PACKAGES="tensorrt-cu13==10.13.3.9 tensorrt-cu13-bindings==10.13.3.9 tensorrt-cu13-libs==10.13.3.9"
ARG TENSORRT_INDEX=https://pypi.nvidia.com

ENV UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY docker/requirements-worker.lock docker/requirements-nodeps.lock docker/
# The CUDA base ships no Python 3.11: uv installs a standalone build (no apt, no PPA).
RUN uv python install ${PYTHON_VERSION} \
    && uv venv /opt/venv --python ${PYTHON_VERSION} \
    && uv pip install --require-hashes -r docker/requirements-worker.lock \
    && uv pip install --require-hashes --no-deps -r docker/requirements-nodeps.lock
# hadolint ignore=SC2086
RUN uv pip install --no-deps --index-url ${TENSORRT_INDEX} ${TENSORRT_PACKAGES}
# The largest, most stable parts go to layers of their own (pulled in parallel, reused while they
# do not change): the CUDA libraries (nvidia/), then torch and triton.
RUN site=/opt/venv/lib/python3.11/site-packages \
    && mkdir -p "/layers/cuda${site}" "/layers/torch${site}" \
    && mv "${site}/nvidia" "/layers/cuda${site}/" \
    && mv "${site}/torch" "${site}/triton" "/layers/torch${site}/"
COPY pyproject.toml README.md ./
COPY realcustom ./realcustom
COPY engines ./engines
COPY service ./service
RUN uv pip install --no-deps .

FROM ${CUDA_IMAGE} AS worker

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    # The root filesystem may be read-only (it is in k8s/): caches go to the artifacts volume.
    XDG_CACHE_HOME=/artifacts/cache \
    MODEL=tiny \
    BACKEND=eager
RUN useradd --system --uid 10001 --user-group --create-home app \
    && install -d -o 10001 -g 10001 /artifacts /models /weights /app \
    # The engines cache defaults to ./artifacts: make that the volume.
    && ln -s /artifacts /app/artifacts
COPY --from=worker-build /layers/cuda/ /
COPY --from=worker-build /layers/torch/ /
COPY --from=worker-build /opt/python /opt/python
COPY --from=worker-build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint.sh
COPY --chmod=0644 docker/worker_ready.py /usr/local/lib/realcustom/worker_ready.py
WORKDIR /app
USER 10001:10001
VOLUME ["/artifacts"]
# Healthy = model loaded and warm; the start-up budget (docs/DEPLOYMENT.md) allows 35 minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=2100s --retries=3 \
    CMD ["python", "/usr/local/lib/realcustom/worker_ready.py"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["worker"]
