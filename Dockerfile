# syntax=docker/dockerfile:1.7
# ModelCommons image: the base image of the KFP components (MODELCOMMONS_IMAGE) and the Ray image of
# the RayService (head and workers). One file, two variants chosen by build arguments:
#
#   CPU: docker build -t registry.example.com/modelcommons:0.1.0 .
#   GPU: docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#                     -t registry.example.com/modelcommons:0.1.0-gpu .
#
# Python 3.11 is a uv-managed standalone build in /opt/python on either base, so the CPU and GPU
# images run the same Python (Ray needs one Python and one Ray version across a cluster).
# Build with the kfp version you compile pipelines with (KFP_VERSION): a lightweight component's
# launcher runs `pip install kfp==<that version>`, which is a no-op only when it is already installed.

# checkov:skip=CKV_DOCKER_7:FROM ${BASE_IMAGE} is an ARG checkov cannot resolve; its values are release tags (debian:bookworm-slim, nvidia/cuda:12.8.1-base-ubuntu24.04), never latest
ARG BASE_IMAGE=debian:bookworm-slim

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

# ---- builder: interpreter + virtualenv with every dependency ---------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG PYTHON_VERSION=3.11
# CPU wheels by default; PyPI's torch is the CUDA build (it bundles the CUDA runtime libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG KFP_VERSION=2.17.0
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
COPY constraints.txt ./
# torch/torchvision first, from the variant's index; the project install below keeps them.
RUN uv pip install --python /opt/venv/bin/python --index "${TORCH_INDEX_URL}" \
        --default-index https://pypi.org/simple -c constraints.txt torch torchvision
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN uv pip install --python /opt/venv/bin/python -c constraints.txt ".[postgres]" "kfp==${KFP_VERSION}"

# ---- runtime: no compilers, no uv, non-root --------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001
ARG GIT_COMMIT=unknown
# wget: KubeRay's default readiness/liveness probes call it inside Ray containers. The package versions
# come from whichever base (Debian or Ubuntu) is chosen, so they cannot be pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${APP_UID}" modelcommons \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --create-home --home-dir /home/modelcommons \
        --shell /bin/bash modelcommons \
    && install -d -o "${APP_UID}" -g "${APP_UID}" /var/lib/modelcommons
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HOME=/home/modelcommons \
    MODELCOMMONS_HOME=/var/lib/modelcommons \
    MODELCOMMONS_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /home/modelcommons
USER ${APP_UID}:${APP_UID}
# Kubernetes ignores Docker health checks; the chart and the RayService define probes instead.
HEALTHCHECK NONE
CMD ["modelcommons", "--help"]
