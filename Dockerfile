# syntax=docker/dockerfile:1
# Bedside images. Targets:
#   gateway    the DICOM/REST gateway (no torch); talks to Triton over gRPC
#   optimizer  `bedside optimize` (torch, MONAI, ONNX, ONNX Runtime)
# Triton itself runs from NVIDIA's NGC image (see charts/ once the chart lands).
# Not built on the development machines (no Docker engine there): keep it simple.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

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
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "/src[optimizer]"

FROM base AS gateway
COPY --from=build-gateway /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /var/lib/bedside
RUN chown bedside:bedside /var/lib/bedside
USER 10001:10001
EXPOSE 8080 11112
ENTRYPOINT ["bedside", "gateway", "--http-host", "0.0.0.0", "--dicom-host", "0.0.0.0", \
            "--spool", "/var/lib/bedside/spool"]
CMD ["--repository", "/models", "--model", "cxr-lesion", "--triton-url", "triton:8001"]

FROM base AS optimizer
COPY --from=build-optimizer /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["bedside", "optimize"]
