# chert-relay in a container. The embedded default (a private redis-server with AOF
# under /var/lib/chert-relay) works out of the box; mount a volume there so queued
# events survive the container. For several replicas, set [redis] url instead.
#
#   docker build -t chert-relay .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 -v chert-relay:/var/lib/chert-relay \
#     -v $PWD/relay.toml:/etc/chert-relay/relay.toml:ro chert-relay
#
# The admin listener (metrics, API, operator page) listens on 0.0.0.0 inside the
# container, or nothing outside it could reach it; publish its port on a private
# interface only (127.0.0.1 above), never on a public one.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/chert-relay --shell /usr/sbin/nologin chert-relay \
 && install -d -o chert-relay -g chert-relay -m 0700 /var/lib/chert-relay

WORKDIR /opt/chert-relay
COPY pyproject.toml README.md ./
COPY relay ./relay
# Optional extras, comma-separated: nats, amqp (broker sinks), otel (tracing), e.g.
#   docker build --build-arg EXTRAS=nats,otel -t chert-relay .
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" && python -c "import relay"
COPY config/relay.example.toml /etc/chert-relay/relay.toml

USER chert-relay
ENV CHERT_RELAY_CONFIG=/etc/chert-relay/relay.toml \
    CHERT_RELAY_LOG_FORMAT=json \
    CHERT_RELAY__RELAY__STATE_DIR=/var/lib/chert-relay \
    CHERT_RELAY__SERVER__LISTEN=0.0.0.0:8080 \
    CHERT_RELAY__ADMIN__LISTEN=0.0.0.0:9090
VOLUME ["/var/lib/chert-relay"]
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"
ENTRYPOINT ["chert-relay"]
CMD ["run"]
