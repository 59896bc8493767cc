# The backchannel relay. Configuration by environment only (BACKCHANNEL_RELAY_*,
# see docs/operators.md); SQLite in the /data volume unless
# BACKCHANNEL_RELAY_DATABASE_URL points at PostgreSQL.
#
#   docker build -t backchannel-relay .
#   docker run -d -p 127.0.0.1:8470:8470 -v relay-data:/data \
#       -e BACKCHANNEL_RELAY_PUBLIC_URL=https://relay.example.org backchannel-relay

FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY server ./server
COPY client ./client
RUN python -m venv /opt/relay && /opt/relay/bin/pip install --no-cache-dir .

FROM python:3.11-slim
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BACKCHANNEL_RELAY_DATA_DIR=/data \
    BACKCHANNEL_RELAY_PORT=8470
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin relay \
    && mkdir -p /data \
    && chown relay:relay /data \
    && chmod 700 /data
COPY --from=build /opt/relay /opt/relay
USER relay
VOLUME ["/data"]
EXPOSE 8470
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BACKCHANNEL_RELAY_PORT', '8470'), timeout=4)"]
ENTRYPOINT ["backchannel-relay"]
CMD ["serve", "--host", "0.0.0.0"]
