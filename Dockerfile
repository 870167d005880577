# token-proxy container image.
#
# Stage 1 builds a virtualenv holding token-proxy and its dependencies, with the data
# path compiled by mypyc (deploy/image/build-venv.sh; it needs a compiler, so this stage
# starts from the full Python image). Stage 2 copies just that venv onto a slim Python
# of the same version and Debian release: no pip, no sources, no build tools.
# tests/test_deploy.py lints this file with hadolint and runs the same build script
# into a fresh venv, since no container engine runs in CI.
#
#   docker build -t token-proxy:0.1.0 .
#   docker run --rm -v "$PWD/config.yaml:/etc/token-proxy/config.yaml:ro" token-proxy:0.1.0

ARG BUILD_IMAGE=python:3.11-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy/ proxy/
COPY deploy/image/build-venv.sh deploy/image/
RUN deploy/image/build-venv.sh /opt/token-proxy

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="token-proxy" \
      org.opencontainers.image.description="Sidecar proxy that adds OAuth 2.0 client-credentials tokens to a service's outbound requests" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/token-proxy /opt/token-proxy
# Bytecode was compiled at install time; the root filesystem is read-only in the pod.
ENV PATH=/opt/token-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# DL3064 flags any variable named *TOKEN*; this one holds a file path, not a secret.
# hadolint ignore=DL3064
ENV TOKEN_PROXY_CONFIG=/etc/token-proxy/config.yaml
# Numeric so that Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 65532:65532
# 15080: forward proxy (binds 127.0.0.1 by default); 15090: /metrics /healthz /readyz /status.
EXPOSE 15080 15090
# SIGTERM starts the graceful drain bounded by shutdown_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["token-proxy", "run"]
