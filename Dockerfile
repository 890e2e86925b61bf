# One image for every hospital site and for the coordinator; FEDCARE_ROLE picks which:
#   docker run -e FEDCARE_ROLE=coordinator ...   (SuperLink; it starts the ServerApp's process itself)
#   docker run -e FEDCARE_ROLE=site ...          (SuperNode of one hospital and its app gate; the default)
# An environment variable, not the command, so that the HEALTHCHECK knows the role too.
# Nothing secret is in the image: TLS certificates and site keys are mounted at /tls, the DICOM
# folder read-only at /data, and /state (ledger, decode cache, FLWR_HOME) is a writable volume.
#
# CPU build by default; for a CUDA site (its entry point then trains on the first GPU the container
# is given, FEDCARE_DEVICE=auto; run it with `docker run --gpus all ...`, see docs/deployment.md):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fedcare:cuda .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/state/flwr-home \
    HOME=/state \
    FEDCARE_TLS_DIR=/tls \
    FEDCARE_DATA=/data \
    FEDCARE_STATE=/state \
    FEDCARE_ROLE=site

# torch first, from the chosen index: a bare torch requirement would pull the multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
# Only what the apps need; .dockerignore keeps outputs, credentials and virtual environments out.
COPY pyproject.toml README.md ./
COPY fedcare ./fedcare
COPY client_app ./client_app
COPY server_app ./server_app
COPY data_adapters ./data_adapters
COPY deploy/entrypoint.sh /usr/local/bin/fedcare-entrypoint
RUN pip install . && chmod 0755 /usr/local/bin/fedcare-entrypoint

# A fixed, unprivileged user; give /state to the same UID on the host (or run with --user).
RUN useradd --uid 10001 --create-home --home-dir /home/fedcare fedcare \
    && mkdir -p /state /data /tls && chown fedcare:fedcare /state
USER 10001:10001
VOLUME ["/state"]

# Sites connect out to this one port of the coordinator (the Fleet API only); a site exposes
# nothing. The coordinator's control port (9093) stays on its loopback and is not exposed.
EXPOSE 9092

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fedcare-entrypoint", "healthcheck"]

ENTRYPOINT ["fedcare-entrypoint"]
