# syntax=docker/dockerfile:1
# The worker image: dependencies from uv.lock exactly, no build tools, not root.

FROM python:3.11.13-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv
# Bytecode compiled at build time, so the read-only app starts fast; copies, not links,
# since the cache mount is gone in the final image.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

FROM python:3.11.13-slim-bookworm
# /var/lib/chatbus: the gateway's session history (a volume in compose), the user's own.
RUN groupadd --system --gid 10001 chatbus \
    && useradd --system --uid 10001 --gid chatbus --no-create-home --shell /usr/sbin/nologin chatbus \
    && install -d -o chatbus -g chatbus /var/lib/chatbus
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8000 \
    LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000
# Liveness only: an unreachable RabbitMQ or Ollama must not get the worker restarted.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"HTTP_PORT\"]}/healthz', timeout=4)"]
# The installed package holds the whole service: `uv run faststream run main:app` in a
# checkout runs the same app.
CMD ["faststream", "run", "chatbus.service:app"]
