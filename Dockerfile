# One image for every role: `api`, `worker`, `migrate`, `serve`, `keys` (the entrypoint is the
# `gradhealth` command). Torch is the CUDA build so that the same image runs GPU workers; the API
# never imports it. Build:  docker build -t gradhealth .
# A CPU-only (much smaller) image:  docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t gradhealth:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADHEALTH_DATA_DIR=/var/lib/gradhealth

WORKDIR /app

# A C++ compiler for `gradhealth build-native` (the engine's recurrent loops, built below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# Torch first, from the CUDA index (its own layer: it is most of the image and changes rarely).
# The CUDA runtime comes with the wheel; the host needs only the NVIDIA driver + container toolkit.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY migrations ./migrations
# Editable: `gradhealth migrate` finds migrations/ next to the service package.
# build-native compiles the C++ loops for this torch into the Python prefix (read-only at run
# time: a process only loads what is built, never compiles).
RUN pip install -e . \
    && gradhealth build-native \
    && useradd --system --uid 10001 --home-dir /var/lib/gradhealth gradhealth \
    && mkdir -p /var/lib/gradhealth \
    && chown gradhealth /var/lib/gradhealth

USER gradhealth
EXPOSE 8000
ENTRYPOINT ["gradhealth"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
