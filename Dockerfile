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
COPY optimizer ./optimizer
COPY services ./services

FROM source AS build-gateway
RUN python -m venv /opt/venv && /opt/venv/bin/pip install /src

FROM source AS build-optimizer
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "torch==2.13.0" \
    && /opt/venv/bin/pip install "/src[optimizer,deploy]"

FROM base AS gateway
COPY --from=build-gateway /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /var/lib/bedside
RUN chown bedside:bedside /var/lib/bedside
USER 10001:10001
EXPOSE 8080 8081 11112
ENTRYPOINT ["bedside", "gateway", "--http-host", "0.0.0.0", "--dicom-host", "0.0.0.0", \
            "--spool", "/var/lib/bedside/spool"]
CMD ["--repository", "/models", "--model", "cxr-lesion", "--triton-url", "triton:8001"]

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
RUN python3 -m pip install --no-cache-dir "onnxruntime==1.20.1" "numpy==1.26.4"
USER 1000:1000
