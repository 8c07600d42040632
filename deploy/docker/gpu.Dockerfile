# syntax=docker/dockerfile:1
# mmguard serve on an NVIDIA GPU: a CUDA runtime + cuDNN base matching onnxruntime-gpu's CUDA
# major version (onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 and cuDNN 9), the serving
# dependencies only (`pip install .`: onnxruntime-gpu, grpcio, numpy, scipy, prometheus-client,
# cryptography; no torch), a non-root user, a gRPC health check. Run it with a GPU (docker run
# --gpus 1, or nvidia.com/gpu in Kubernetes); `--device cuda` makes startup fail loudly without
# one.
#   docker build -f deploy/docker/gpu.Dockerfile -t mmguard:0.1.0-gpu .
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/mmguard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY calibrate ./calibrate
RUN /opt/mmguard/bin/pip install . \
    && /opt/mmguard/bin/python -c "import guard.server" \
    && /opt/mmguard/bin/python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    && /opt/mmguard/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mmguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin mmguard \
    && mkdir -p /models && chown 10001:10001 /models
COPY --from=build /opt/mmguard /opt/mmguard
COPY deploy/docker/healthcheck.py /opt/mmguard/healthcheck.py
ENV PATH=/opt/mmguard/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /models
# 8001: gRPC (Open Inference Protocol, grpc.health.v1); 8002: Prometheus /metrics
EXPOSE 8001 8002
# SERVING only after the warm-up (every batch size on the GPU); the start period covers it
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/mmguard/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mmguard"]
CMD ["serve", "/models/model", "--port", "8001", "--metrics-port", "8002", "--device", "cuda"]
