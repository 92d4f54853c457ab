# syntax=docker/dockerfile:1
# The gradwatch server: FastAPI + uvicorn, SQLite or PostgreSQL (psycopg 3). No TensorFlow: the
# training side (gradwatch.agent) runs in your training job, not here.
#
#   docker build -t gradwatch .
#   docker run --rm -p 127.0.0.1:8000:8000 gradwatch gradwatch server --host 0.0.0.0 --insecure
#
# The default command binds 0.0.0.0 without --insecure, so it refuses to start until the
# database holds an API token (see README, "Tokens"); docker-compose.yml decides for the stack.

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Only what the wheel needs: the metadata, the README it embeds and the three packages.
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY server ./server
COPY wire ./wire
RUN pip wheel --wheel-dir /wheels ".[server,postgres]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "gradwatch[server,postgres]" \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/gradwatch gradwatch
USER gradwatch
WORKDIR /var/lib/gradwatch
# SQLite in the (volume-friendly) home folder unless GRADWATCH_DATABASE_URL says otherwise.
ENV GRADWATCH_DATABASE_URL=sqlite:////var/lib/gradwatch/gradwatch.db
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["gradwatch", "server", "--host", "0.0.0.0", "--port", "8000"]
