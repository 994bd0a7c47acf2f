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

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# The project in a virtual environment with the CPU runtime; copied whole into `serve`.
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY marginwatch ./marginwatch
COPY artifact ./artifact
COPY service ./service
COPY calibration ./calibration
COPY models ./models
RUN /opt/venv/bin/pip install ".[cpu]"

# ---------------------------------------------------------------------------------------------
# The calibration job: torch pinned first (a bare `torch` requirement pulls a multi-GB CUDA
# build; pass TORCH_INDEX_URL to take the CPU-only wheel from an index that has it), then the
# project. Fashion-MNIST (the job's default dataset) comes from Debian's dataset-fashion-mnist.
FROM ${PYTHON_IMAGE} AS calibrate
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib \
    MARGINWATCH_STORE=/store
RUN apt-get update \
    && apt-get install --yes --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY marginwatch ./marginwatch
COPY artifact ./artifact
COPY service ./service
COPY calibration ./calibration
COPY models ./models
RUN pip install ".[torch,cpu]" && rm -rf /src
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin marginwatch \
    && mkdir -p /store && chown marginwatch:marginwatch /store
USER 10001
WORKDIR /home/marginwatch
ENTRYPOINT ["marginwatch-calibrate"]

# ---------------------------------------------------------------------------------------------
# Serving on a GPU: CUDA 12 + cuDNN 9 runtime (what onnxruntime-gpu's default wheels link
# against) and the distribution's Python (3.12 on Ubuntu 24.04; the project needs >= 3.11).
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MARGINWATCH_STORE=/opt/marginwatch/artifacts \
    MARGINWATCH_DEVICE=cuda \
    MARGINWATCH_INLINE_MAX_SAMPLES=0
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY marginwatch ./marginwatch
COPY artifact ./artifact
COPY service ./service
COPY calibration ./calibration
COPY models ./models
RUN pip install ".[gpu]" && rm -rf /src
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
