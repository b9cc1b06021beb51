# The listener image. Build: docker build -t cdc-invalidator .
# Run:   docker run --rm -v $PWD/config.toml:/etc/cdc-invalidator/config.toml:ro cdc-invalidator
# Any subcommand works too: docker run ... cdc-invalidator check
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
# psycopg[binary] and hiredis come as wheels: no compiler needed.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
RUN pip install . \
    && rm -rf /build

# The listener needs no privileges in the container.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cdc
USER cdc
WORKDIR /home/cdc

# Mount the configuration here, or point CDC_INVALIDATOR_CONFIG elsewhere. Every scalar
# setting can also be given as CDC_INVALIDATOR_<NAME>, which wins over the file.
ENV CDC_INVALIDATOR_CONFIG=/etc/cdc-invalidator/config.toml
# With metrics_port set, /metrics, /healthz and /readyz must be reachable from outside the
# container (Prometheus, the kubelet): every interface here, where the listener's default
# is loopback only. The container's network (published ports, network policies) decides
# who reaches them.
ENV CDC_INVALIDATOR_METRICS_ADDRESS=0.0.0.0

# Logs are JSON lines (stdout is not a terminal); SIGTERM (docker stop) finishes the
# batch in hand and exits 0.
ENTRYPOINT ["cdc-invalidator"]
CMD ["run"]
