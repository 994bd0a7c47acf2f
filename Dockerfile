# syntax=docker/dockerfile:1
#
# marginwatch images, one Dockerfile, three targets (see deploy/README.md):
#
#   docker build --target serve     -t marginwatch:0.1.0 .            CPU serving (the default)
#   docker build --target serve-gpu -t marginwatch:0.1.0-gpu .        CUDA serving (onnxruntime-gpu)
#   docker build --target calibrate -t marginwatch-calibrate:0.1.0 .  the calibration job (torch)
#
# The serving images carry no torch. The store defaults to the artifacts/ baked into the image;
# mount a store elsewhere and point MARGINWATCH_STORE at it to serve newer versions.
#
# Reproducible (deploy/README.md "Reproducible images"): the base images are pinned by digest
# (deploy/images/refresh-digests.sh moves them), every Python package comes from the image's lock
# with hashes (deploy/images/*.lock.txt, `make lock`), installed with --require-hashes --no-deps,
# and the project itself last, with --no-deps. tests/deploy/test_dockerfile.py runs the serve
# target's build steps outside a container and runs hadolint on this file.

# Multi-platform index digests: the tag says what it is, the digest fixes the bytes.
ARG PYTHON_IMAGE=python:3.11-slim-trixie@sha256:9534e5a8e315485d4061ed659af0fd78a284c015f9b73661b41d6bab25604534
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:14d94b039cb94bbd5da559f303b46bc4b0d5d6c24ab1a9d7b186e566ed3400dc

# ---------------------------------------------------------------------------------------------
# The project's source, from the build context, as the repository lays it out: `marginwatch/`
# holds links to the four top-level folders (COPY keeps them as links), and setup.py refuses to
# build where they arrived as text files. Each stage below takes it with one COPY --from.
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY marginwatch ./marginwatch
COPY artifact ./artifact
COPY service ./service
COPY calibration ./calibration
COPY models ./models

# ---------------------------------------------------------------------------------------------
# The project in a virtual environment with the CPU runtime; copied whole into `serve`.
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The locked packages before the sources: this layer stays cached while only the code changes.
COPY deploy/images/serve.lock.txt ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r serve.lock.txt
COPY --from=source /src ./
# The build backend is the lock's (build.in), not one fetched for an isolated build; `pip check`
# fails the build when the lock misses a dependency of the project.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
# The calibration job. Its lock pins torch==2.13.0+cpu (a bare `torch` pulls several GB of CUDA
# libraries), a build that only an index of torch's CPU wheels serves: pass it as
# TORCH_INDEX_URL. pip adds it to the default index and accepts, from either, only the files
# whose hashes the lock lists (--require-hashes needs a hash for every package, so the lock,
# not the index, decides what is installed). The GPU overlay's image takes the CUDA build:
# --build-arg CALIBRATE_LOCK=deploy/images/calibrate-gpu.lock.txt, without TORCH_INDEX_URL.
# Fashion-MNIST (the job's default dataset) comes from Debian's dataset-fashion-mnist.
FROM ${PYTHON_IMAGE} AS calibrate
ARG TORCH_INDEX_URL=""
ARG CALIBRATE_LOCK=deploy/images/calibrate.lock.txt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib \
    MARGINWATCH_STORE=/store
# DL3008 (apt versions unpinned): the archive drops a version once it is superseded, so a pin
# breaks the build at the next update; the base digest fixes the distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY ${CALIBRATE_LOCK} ./calibrate.lock.txt
RUN pip install --require-hashes --no-deps \
    ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r calibrate.lock.txt
COPY --from=source /src ./
RUN pip install --no-deps --no-build-isolation . && pip check && rm -rf /src
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin marginwatch \
    && mkdir -p /store && chown marginwatch:marginwatch /store
USER 10001
WORKDIR /home/marginwatch
ENTRYPOINT ["marginwatch-calibrate"]

# ---------------------------------------------------------------------------------------------
# Serving on a GPU: CUDA 13 + cuDNN 9 runtime (what the locked onnxruntime-gpu links against:
# libcudart.so.13, libcublas.so.13; the nodes' NVIDIA driver must support CUDA 13, >= 580) and
# the distribution's Python (3.12 on Ubuntu 24.04; the project needs >= 3.11), so its lock is
# resolved for CPython 3.12.
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MARGINWATCH_STORE=/opt/marginwatch/artifacts \
    MARGINWATCH_DEVICE=cuda \
    MARGINWATCH_INLINE_MAX_SAMPLES=0
# DL3008: as in `calibrate` (python3 takes Ubuntu's security updates, which replace the version).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY deploy/images/serve-gpu.lock.txt ./
RUN pip install --require-hashes --no-deps -r serve-gpu.lock.txt
COPY --from=source /src ./
RUN pip install --no-deps --no-build-isolation . && pip check && rm -rf /src
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin marginwatch
COPY --chown=root:root artifacts /opt/marginwatch/artifacts
USER 10001
WORKDIR /opt/marginwatch
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
CMD ["marginwatch-serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# Serving on CPU (last, so a plain `docker build .` builds it).
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MARGINWATCH_STORE=/opt/marginwatch/artifacts
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin marginwatch
COPY --from=build-cpu /opt/venv /opt/venv
COPY --chown=root:root artifacts /opt/marginwatch/artifacts
USER 10001
WORKDIR /opt/marginwatch
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
CMD ["marginwatch-serve", "--host", "0.0.0.0", "--port", "8000"]
