# omni for GPU clusters: NVIDIA's NGC PyTorch image (CUDA, NCCL, cuDNN, a matching torch and
# Transformer Engine) plus omni with the `gpu` and `hf` extras. Build:
#   docker build -t omni:latest .
# (Slurm launch through `omni launch slurm` is planned, issue #22; see docs/architecture.md.)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=8

WORKDIR /opt/omni
COPY pyproject.toml README.md ./
COPY omni omni
COPY tokenizers tokenizers
COPY decoders decoders
COPY parallel parallel
COPY eval eval
COPY recipes recipes

# The base image pins torch (PIP_CONSTRAINT) and already ships Transformer Engine; pip keeps both.
RUN pip install --no-cache-dir ".[gpu,hf]" && omni --version

ENTRYPOINT ["omni"]
CMD ["--help"]
