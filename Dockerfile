# One recipe for every service. They share Python, uv, the lock file and `shared/`, so one
# file keeps them in step; the SERVICE build argument picks the workspace member an image
# installs (gateway, worker or demo_llm), and the image gets only that member and `shared`.
FROM python:3.11-slim

ARG SERVICE=gateway
ENV SERVICE=${SERVICE} \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    HOST=0.0.0.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir "uv==0.13.9"
WORKDIR /app

# Dependencies first, from the lock alone: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/pyproject.toml
COPY services/gateway/pyproject.toml services/gateway/pyproject.toml
COPY services/worker/pyproject.toml services/worker/pyproject.toml
COPY services/demo_llm/pyproject.toml services/demo_llm/pyproject.toml
RUN uv sync --frozen --no-dev --no-install-workspace --package "streamgate-${SERVICE//_/-}"

COPY shared shared
COPY services services
RUN uv sync --frozen --no-dev --package "streamgate-${SERVICE//_/-}"

USER 65534
CMD ["sh", "-c", "exec python -m \"$SERVICE\""]
