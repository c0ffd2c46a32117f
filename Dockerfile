# The SLM inference server image (server/slm_server), run by the operator's Deployments.
#
#   docker build -t slm-server:0.1.0 .
#   docker build --build-arg CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04 -t slm-server:0.1.0 .
#   docker run --gpus all -p 8000:8000 -e SLM_MODEL=/models/phi-3 -v /models:/models:ro slm-server:0.1.0
#
# The CUDA base only has to provide the driver-facing runtime: the PyTorch wheels bring their own
# CUDA libraries. Python comes from uv (a standalone CPython 3.11, as the lock was resolved for),
# so the base image's Python, if any, does not matter. Versions come from requirements.lock.
# Runs as a non-root user with nothing to write outside /tmp (a read-only root filesystem works).

ARG CUDA_BASE=nvidia/cuda:12.6.3-base-ubuntu24.04
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${CUDA_BASE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
# Dependencies first (a layer that survives code changes), pinned by the lock, server extra only.
COPY pyproject.toml requirements.lock ./
RUN VIRTUAL_ENV=/opt/venv uv pip install --requirements pyproject.toml --extra server --constraints requirements.lock
# Then the project itself (both packages live in one distribution; the operator part is small).
COPY README.md ./
COPY operator ./operator
COPY server ./server
RUN VIRTUAL_ENV=/opt/venv uv pip install --no-deps . \
    && /opt/venv/bin/python -c "import slm_server.app, torch, transformers"

FROM ${CUDA_BASE}
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
RUN groupadd --gid 10001 slm && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp slm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    SLM_CACHE_DIR=/tmp/slm-monitoring \
    SLM_HOST=0.0.0.0 \
    SLM_PORT=8000
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Probes: GET /healthz (liveness), GET /readyz (503 until the model is loaded). SIGTERM drains.
ENTRYPOINT ["slm-server"]
