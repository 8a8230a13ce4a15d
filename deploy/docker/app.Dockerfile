# syntax=docker/dockerfile:1
#
# The application image of the Helm chart (deploy/helm/instructrec): the stream workers (`instructrec
# worker`), the jobs (`instructrec index`) and the fine-tune worker (`instructrec finetune`). Build it from
# the repository root (the build context is the checkout, trimmed by .dockerignore):
#
#   docker build -f deploy/docker/app.Dockerfile -t REGISTRY/instructrec-stream:0.1.0 .
#
# tests/unit/test_images.py checks it against pyproject.toml and the chart (pins, uid, entrypoint, commands).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# torch first: the version pyproject.toml pins, by default the CPU build from PyTorch's CPU index, then pinned
# by a constraints file for the project's install, as `make venv` does, so that pip never resolves the CUDA
# build from PyPI as a dependency (the stream workers embed short texts on the CPU). For a fine-tune worker on
# a GPU (finetune.gpu in the chart; it trains on a GPU when torch sees one) build a second tag with
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && echo "torch==2.13.0" > /etc/pip-constraints.txt

# The checkout at /opt/instructrec, installed editable: exporting a model version (`instructrec export`, the
# fine-tune worker) copies the Triton backend from its deploy/triton. Bytecode is compiled here: the root
# file system is read-only at run time.
WORKDIR /opt/instructrec
COPY pyproject.toml README.md ./
COPY instructrec/ instructrec/
COPY streams/ streams/
COPY workers/ workers/
COPY deploy/ deploy/
RUN pip install -c /etc/pip-constraints.txt -e /opt/instructrec \
 && python -m compileall -q instructrec streams workers

# The chart's podSecurityContext runs it as 10001:10001; the user exists so that tools can name it.
RUN groupadd --system --gid 10001 instructrec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin instructrec
USER 10001:10001

ENTRYPOINT ["instructrec"]
CMD ["--help"]
