# syntax=docker/dockerfile:1
#
# gradmix-server: the selection server (numpy, scipy, zarr, grpcio; no torch).
#
# Build from the repository root (the context is the repository; the file
# server.Dockerfile.dockerignore beside this one keeps it small):
#   docker build -f deploy/docker/server.Dockerfile -t gradmix-server:0.1.0 .
# EXTRAS picks the pyproject extras: the default adds s3fs so one image serves
# both a local store and an s3:// store; `--build-arg EXTRAS=server` is the
# smallest image (local or memory:// stores only).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=server,s3
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/gradmix
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY proto/ proto/
COPY store/ store/
COPY client/ client/
COPY server/ server/
COPY trainer/ trainer/
# A regular (non-editable) install: the final stage needs the venv only.
RUN /opt/gradmix/bin/pip install -c constraints.txt ".[${EXTRAS}]" \
 && /opt/gradmix/bin/python -c "import gradmix.server.app, grpc_health.v1.health_pb2"

FROM ${PYTHON_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="gradmix-server" \
      org.opencontainers.image.description="gradmix selection server (gRPC v1, Prometheus metrics)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${UID}" gradmix \
 && useradd --system --no-log-init --uid "${UID}" --gid gradmix \
        --home-dir /var/lib/gradmix --shell /usr/sbin/nologin gradmix \
 && mkdir -p /var/lib/gradmix/store \
 && chown -R gradmix:gradmix /var/lib/gradmix
COPY --from=build /opt/gradmix /opt/gradmix
COPY deploy/docker/healthcheck.py /opt/gradmix/healthcheck.py
# The server binds all interfaces in a container; the store defaults to the
# volume below; grpc.health.v1 is also served in plaintext on 50552 (for the
# health check below and Kubernetes probes, which cannot speak TLS). All of
# them (and every other setting) can be overridden by flags, GRADMIX_*
# variables or a TOML file passed with --config. The server needs TLS
# settings (GRADMIX_TLS_CERT, GRADMIX_TLS_KEY and tokens) or --insecure.
ENV PATH=/opt/gradmix/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/gradmix \
    GRADMIX_HOST=0.0.0.0 \
    GRADMIX_STORE=/var/lib/gradmix/store \
    GRADMIX_HEALTH_PORT=50552
WORKDIR /var/lib/gradmix
VOLUME ["/var/lib/gradmix"]
USER ${UID}:${UID}
# 50551: gRPC (gradmix.v1, grpc.health.v1, reflection); 9551: /metrics;
# 50552: plaintext grpc.health.v1 only.
EXPOSE 50551 9551 50552
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/gradmix/healthcheck.py"]
ENTRYPOINT ["gradmix-server"]
