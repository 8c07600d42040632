# syntax=docker/dockerfile:1
# mmguard serve on CPU: the serving dependencies only (onnxruntime, grpcio, numpy, scipy,
# prometheus-client; no torch), a non-root user, a gRPC health check.
#   docker build -f deploy/docker/cpu.Dockerfile -t mmguard:0.1.0-cpu .
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/artifacts/my-model:/models/model:ro" mmguard:0.1.0-cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mmguard
# onnxruntime (CPU) in place of pyproject's onnxruntime-gpu, then the package without deps
COPY deploy/docker/requirements-cpu.txt /tmp/requirements-cpu.txt
RUN /opt/mmguard/bin/pip install -r /tmp/requirements-cpu.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY calibrate ./calibrate
RUN /opt/mmguard/bin/pip install --no-deps . \
    && /opt/mmguard/bin/python -c "import guard.server" \
    && /opt/mmguard/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 mmguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin mmguard \
    && mkdir -p /models && chown 10001:10001 /models
COPY --from=build /opt/mmguard /opt/mmguard
COPY deploy/docker/healthcheck.py /opt/mmguard/healthcheck.py
ENV PATH=/opt/mmguard/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /models
# 8001: gRPC (Open Inference Protocol, grpc.health.v1); 8002: Prometheus /metrics
EXPOSE 8001 8002
# SERVING only after the warm-up; the start period covers it
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/mmguard/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mmguard"]
CMD ["serve", "/models/model", "--port", "8001", "--metrics-port", "8002", "--device", "cpu"]
