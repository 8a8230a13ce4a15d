# syntax=docker/dockerfile:1
#
# The Triton image of the Helm chart (triton.image): NVIDIA's Triton Inference Server from NGC, with what the
# reranker's Python backend (deploy/triton/instructrec_reranker/1/model.py) imports in the server's own
# Python: instructrec.serving and its packages. The model repository is not in the image: it is the chart's
# volume, which an init container seeds with the configs and backend code of /opt/instructrec/deploy/triton.
# The chart runs `tritonserver` (the NGC image has it on PATH) and /bin/sh; nothing here changes either.
# Build it from the repository root:
#
#   docker build -f deploy/docker/triton.Dockerfile -t REGISTRY/instructrec-triton:26.08-py3 .
#
# tests/unit/test_images.py checks it against pyproject.toml and the chart (base image tag, pins, imports).
FROM nvcr.io/nvidia/tritonserver:26.08-py3

# The NGC image's Python may be marked externally managed (PEP 668): this image is that environment.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# torch first: the CUDA build of the version pyproject.toml pins, from PyTorch's index for CUDA 13.0, the
# CUDA that torch 2.13.0's Linux wheel on PyPI is built against (it requires cuda-toolkit 13.0.3). The wheel
# brings its CUDA libraries and needs only the node's driver. For a CPU-only Triton (triton.gpu.enabled:
# false) build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. Then pinned by a
# constraints file, so that no later install replaces it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN python3 -m pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && echo "torch==2.13.0" > /etc/pip-constraints.txt

# The backend's other packages, with pyproject.toml's pins (safetensors comes with transformers; it is named
# because the backend imports it).
RUN python3 -m pip install -c /etc/pip-constraints.txt \
      "numpy>=1.26,<2" "transformers>=5.17,<5.24" "peft==0.21.2" "orjson>=3.10,<4" safetensors

# The checkout at /opt/instructrec (triton.modelRepository.seed.from is its deploy/triton), installed editable
# without its dependencies: `import instructrec` works for the backend stub, while the stream, Kafka and
# Qdrant clients stay in the application image (so the `instructrec` command does not run here).
COPY pyproject.toml README.md /opt/instructrec/
COPY instructrec/ /opt/instructrec/instructrec/
COPY deploy/ /opt/instructrec/deploy/
RUN python3 -m pip install --no-deps -e /opt/instructrec \
 && python3 -m compileall -q /opt/instructrec/instructrec
