# syntax=docker/dockerfile:1
# Bedside images. Targets:
#   gateway     the DICOM/REST gateway (no torch); talks to Triton over gRPC
#   optimizer   `bedside optimize` and `bedside deploy` (torch, MONAI, ONNX, ONNX Runtime, Helm SDK)
#   triton-cpu  NVIDIA's Triton image plus ONNX Runtime for the python backend, to serve
#               `bedside optimize --target cpu` repositories on CPU-only clusters
# On GPU nodes Triton runs from NVIDIA's NGC image unchanged (charts/bedside).
# Not built on the development machines (no Docker engine there): keep it simple.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin bedside

FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY optimizer ./optimizer
COPY services ./services

# Dependencies only from the hashed locks (scripts/lock.sh writes them from pyproject.toml):
# every file is checked against its hash, nothing unlisted is pulled in, and the project
# itself goes in without dependencies and without build isolation (its build backend,
# setuptools, is in the lock too).
FROM source AS build-gateway
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/gateway.lock \
    && /opt/venv/bin/pip install --no-deps --no-build-isolation /src

# torch 2.13.0+cpu is on the PyTorch CPU index (PyPI's linux wheel is the CUDA build).
FROM source AS build-optimizer
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps \
       --extra-index-url https://download.pytorch.org/whl/cpu -r requirements/optimizer.lock \
    && /opt/venv/bin/pip install --no-deps --no-build-isolation /src

FROM base AS gateway
COPY --from=build-gateway /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /var/lib/bedside
RUN chown bedside:bedside /var/lib/bedside
USER 10001:10001
EXPOSE 8080 8081 11112
ENTRYPOINT ["bedside", "gateway", "--http-host", "0.0.0.0", "--dicom-host", "0.0.0.0", \
            "--spool", "/var/lib/bedside/spool"]
# Security is explicit (README "Security"): mount the API keys file and a TLS certificate here,
# or replace these with --no-auth / --plaintext on a trusted network.
CMD ["--repository", "/models", "--model", "cxr-lesion", "--triton-url", "triton:8001", \
     "--api-keys", "/etc/bedside/api-keys/keys.yaml", \
     "--tls-cert", "/etc/bedside/tls/tls.crt", "--tls-key", "/etc/bedside/tls/tls.key"]

FROM base AS optimizer
COPY --from=build-optimizer /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /work
USER 10001:10001
# `docker run IMAGE optimize ...` or `docker run IMAGE deploy ...`
ENTRYPOINT ["bedside"]
CMD ["--help"]

FROM ${TRITON_IMAGE} AS triton-cpu
# The python backend hosts ONNX Runtime (optimizer/triton_backend/model.py); numpy<2 because
# Triton's python backend returns empty outputs with numpy 2 (DESIGN.md).
COPY requirements/triton-cpu.lock /tmp/triton-cpu.lock
RUN python3 -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/triton-cpu.lock \
    && rm /tmp/triton-cpu.lock
USER 1000:1000
