# One image for every liverseg pod: Ray head/workers and the RayJob submitter, `liverseg serve`, the
# MLflow tracking server (mlflow[auth], psycopg and boto3 come with the package's extras) and the
# bucket Job. Installed as `make` installs it: the package with its extras (dev tools left out).
#   CPU:  docker build -t liverseg:0.2.0-cpu --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   CUDA: docker build -t liverseg:0.2.0-cuda --build-arg GIT_COMMIT="$(git rev-parse HEAD)" \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
# pip's torch for Linux x86_64 bundles CUDA (it also runs on CPU); a CPU-only build may pass
# --build-arg TORCH_INDEX_URL=<a CPU wheel index> to make the image about 2 GB smaller.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

ARG EXTRAS=s3,team
ARG TORCH_INDEX_URL=
ARG GIT_COMMIT=unknown
ARG UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3 is already there on the Python base; the CUDA base (Ubuntu) needs it and venv.
# wget: KubeRay's default readiness/liveness probes call it. Distribution versions are left to the
# pinned base image.
# hadolint ignore=DL3008,SC2086
RUN py=""; command -v python3 >/dev/null || py="python3 python3-venv"; \
    apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget $py \
    && rm -rf /var/lib/apt/lists/*

# A virtualenv on both bases (Ubuntu's system Python refuses pip, PEP 668). KubeRay starts Ray in a
# login shell, whose /etc/profile resets PATH on Debian: profile.d puts the venv back.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    DVC_NO_ANALYTICS=1
# single quotes on purpose: $PATH expands when the login shell reads the file (SC2016)
# hadolint ignore=SC2016
RUN python3 -m venv /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/liverseg-venv.sh

WORKDIR /app
COPY pyproject.toml README.md ./
COPY platform ./platform
# The local package, not a name from the index: its version ranges are pyproject's (DL3013 is about
# unpinned index names).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[${EXTRAS}]"
COPY pipelines ./pipelines
COPY deploy/make_bucket.py ./deploy/make_bucket.py

# No .git in the image: the commit travels as a build argument and is recorded on every run.
ENV LIVERSEG_GIT_COMMIT=${GIT_COMMIT}

# Unprivileged user (numeric, so Kubernetes' runAsNonRoot can check it). /var/lib/liverseg is state:
# a named volume mounted there (compose's MLflow auth database) inherits this owner.
RUN useradd --uid "${UID}" --gid 0 --create-home --shell /bin/bash liverseg \
    && install -d -o "${UID}" -g 0 -m 0770 /var/lib/liverseg
USER ${UID}
EXPOSE 5000 8080
CMD ["liverseg", "--help"]
