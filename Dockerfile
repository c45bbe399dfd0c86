# chat-actors worker image: slim, non-root, `bin/chat-actors run` as PID 1 (it handles
# SIGTERM itself: drain within shutdown.grace_s, a second signal stops at once).
#   docker build -t chat-actors .
#   docker run --rm -e CHAT_ACTORS__KAFKA__BOOTSTRAP_SERVERS=kafka:9092 ... chat-actors
# Only the worker's own dependencies are installed (no local stack, tests or benchmark).
# The gateway runs from the same image (deploy/k8s/gateway.yaml: `bin/chat-actors gateway`).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY bin/bootstrap.py bin/uv-requirements.txt bin/
# uv from its hashed pin, then exactly uv.lock's core set (no extras: no local stack, tests
# or benchmark), every file checked against its hash; a lock behind pyproject.toml fails.
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        --only-binary :all: --target /opt/uv -r bin/uv-requirements.txt \
 && UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 \
        /opt/uv/bin/uv sync --locked --no-dev --python /usr/local/bin/python3 \
 && sha256sum pyproject.toml uv.lock bin/bootstrap.py bin/uv-requirements.txt | sha256sum \
        | cut -c1-16 > /opt/venv/.chat-actors-installed

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 chat
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml uv.lock ./
COPY bin/ bin/
COPY actors/ actors/
COPY gateway/ gateway/
COPY messages/ messages/
COPY config/ config/
COPY tools/ tools/
RUN mkdir -p /app/.data && chown chat:chat /app/.data
ENV CHAT_ACTORS_VENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER chat
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["bin/chat-actors", "run"]
CMD ["--config", "config/default.toml"]
