# sglang-fleet: one image for every role (FLEET_ROLE=prefill|decode|regular|router).
#
# GPU image (the default target; the engine, torch and NCCL come from the SGLang image):
#   docker build -t sglang-fleet:gpu .
# CPU image for demos and tests (sim engine, no GPU; scripts/images builds it):
#   docker build --target cpu --build-arg BASE_IMAGE=python:3.12-slim -t sglang-fleet:cpu .
#
# supervisord is PID 1 (entrypoint/docker-entrypoint.sh, config/supervisord/). A program that exits
# stops the container with its status; a configuration error exits 78 before anything starts.
# Give a node container time to withdraw its registration, drain and stop its engine on stop: at least
# FLEET_DRAIN_TIMEOUT + FLEET_STOP_GRACE + 15 s (90 for the defaults): docker run --stop-timeout 90,
# compose stop_grace_period: 90s, Kubernetes terminationGracePeriodSeconds: 90, Nomad kill_timeout.
# No secrets are baked in: pass HF_TOKEN, CONSUL_HTTP_TOKEN, FLEET_ROUTER_API_KEY at run time.

# The SGLang release whose own parser checks every command line sglang-fleet emits (tests/conformance).
# Older bases need SGLang >= 0.5.22 for --attn-dp-size (DeepSeek presets); see docs/deployment.md.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.23

FROM ${BASE_IMAGE} AS runtime
ARG PYTHON=python3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV FLEET_HOME=/opt/sglang-fleet \
    PATH=/opt/sglang-fleet/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv that still sees the base's site-packages (sglang, torch on the GPU image), so sglang-fleet's
# dependencies never replace the engine's. Falls back to the base's pip where ensurepip is missing.
RUN { ${PYTHON} -m venv --system-site-packages "$FLEET_HOME" 2>/dev/null \
      || ${PYTHON} -m venv --system-site-packages --without-pip "$FLEET_HOME"; } \
 && { getent passwd fleet >/dev/null \
      || { groupadd --gid 10001 fleet \
           && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/fleet --shell /bin/bash fleet; }; } \
 && install -d -m 1777 /run/sglang-fleet

# Dependencies before the source, so a code change reuses this layer: the project's metadata with
# an empty package pulls in every dependency (and the router extra, smg), then the stub is removed.
COPY pyproject.toml /tmp/deps/
RUN mkdir -p /tmp/deps/entrypoint/sglang_fleet \
 && touch /tmp/deps/README.md /tmp/deps/entrypoint/sglang_fleet/__init__.py \
 && "$FLEET_HOME/bin/python" -m pip install --quiet "setuptools>=77" wheel "/tmp/deps[router]" \
 && "$FLEET_HOME/bin/python" -m pip uninstall --quiet --yes sglang-fleet \
 && rm -rf /tmp/deps

COPY pyproject.toml /tmp/src/
COPY entrypoint/sglang_fleet /tmp/src/entrypoint/sglang_fleet
RUN touch /tmp/src/README.md \
 && "$FLEET_HOME/bin/python" -m pip install --quiet --no-deps --no-build-isolation /tmp/src \
 && rm -rf /tmp/src \
 && sglang-fleet --version

# supervisord programs and the entrypoint (presets, NCCL profiles and ACL policies are package data).
COPY config /etc/sglang-fleet/
COPY entrypoint/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh

# Last in the stage: a new revision must not invalidate the cached layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="sglang-fleet" \
      org.opencontainers.image.description="Self-assembling multi-node SGLang: Consul rendezvous, supervised engines, a router that follows Consul" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# HTTP (engine), dist-init, PD bootstrap, router, router metrics, the supervisor's /livez /readyz /metrics
# (FLEET_HEALTH_PORT). NCCL uses further ports (see docs).
EXPOSE 30000 20000 8998 8000 29000 9400
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=8s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/docker-entrypoint.sh", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]

# Demos and tests: the CPU stand-in engine, as an unprivileged user.
FROM runtime AS cpu
ENV FLEET_ENGINE=sim
USER 10001:10001
WORKDIR /home/fleet

# Production (the default target): SGLang's own engine. Runs as root: GPU, InfiniBand verbs devices,
# memlock and the model cache of the SGLang image expect it.
FROM runtime AS gpu
