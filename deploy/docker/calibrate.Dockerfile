# syntax=docker/dockerfile:1
# mmguard calibrate as a one-shot container (torch, CPU): reads the model and the clean set,
# writes the artifact directory the serving images load, then exits.
#   docker build -f deploy/docker/calibrate.Dockerfile -t mmguard-calibrate:0.1.0 .
#   docker run --rm -v "$PWD/inputs:/inputs:ro" -v "$PWD/artifacts:/artifacts" mmguard-calibrate:0.1.0 \
#       --arch resnet18 --weights /inputs/model.pt --data /inputs/clean --out /artifacts/my-model
# torch from the default index carries CUDA libraries the calibration does not use; pass
# --build-arg PIP_EXTRA_INDEX_URL=<a CPU-only wheel index> for a smaller image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/mmguard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY calibrate ./calibrate
RUN /opt/mmguard/bin/pip install ".[calibrate]" \
    && /opt/mmguard/bin/python -c "import calibrate.pipeline"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 mmguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin mmguard \
    && mkdir -p /artifacts /inputs && chown 10001:10001 /artifacts
COPY --from=build /opt/mmguard /opt/mmguard
# the tiny backdoored example (what `make demo` calibrates), for the compose demo
COPY calibrate/examples/tiny /opt/mmguard/examples/tiny
ENV PATH=/opt/mmguard/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /artifacts
# one-shot: it exits when the artifact is written (status 0) or on bad input (status 2)
HEALTHCHECK NONE
ENTRYPOINT ["mmguard", "calibrate"]
CMD ["--help"]
