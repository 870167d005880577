# token-proxy container image.
#
# Stage 1 builds a virtualenv holding token-proxy and its dependencies (wheels only:
# aiohttp, httptools, uvloop and cryptography all ship manylinux wheels, so no compiler
# is needed). Stage 2 copies just that venv onto a fresh slim Python: no pip cache, no
# sources, no build tools. tests/test_deploy.py lints this file with hadolint and runs
# the same pip install into a fresh venv, since no container engine runs in CI.
#
#   docker build -t token-proxy:0.1.0 .
#   docker run --rm -v "$PWD/config.yaml:/etc/token-proxy/config.yaml:ro" token-proxy:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# No pip inside the venv: the image's own pip installs into it (--python), so the
# final image carries no package installer.
RUN python -m venv --without-pip /opt/token-proxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# A plain (non-editable) install, so the venv does not point back at /src.
RUN pip --python /opt/token-proxy/bin/python install --no-cache-dir "./[speed]"

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
