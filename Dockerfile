# The listener image. Build: docker build -t cdc-invalidator .
# Run:   docker run --rm -v $PWD/conf:/etc/cdc-invalidator:ro cdc-invalidator  (conf/config.toml;
#        a directory, not the file: an edited file is a new file, which a file mount never shows)
# Any subcommand works too: docker run ... cdc-invalidator check
# The wheel is built in a stage of its own, with a C compiler for capture/_walk.c
# (logical mode's tuple walks in C) and sink/_slots.c (a Redis Cluster's hash slots);
# the package builds without them, slower, which the final stage refuses. psycopg[binary] and hiredis come as wheels.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "from cdc_invalidator.capture.pgoutput import NATIVE_WALKS; assert NATIVE_WALKS, 'capture/_walk.c was not built'" \
    && python -c "from cdc_invalidator.sink.slots import NATIVE_SLOTS; assert NATIVE_SLOTS, 'sink/_slots.c was not built'" \
    && cdc-invalidator --help >/dev/null

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
