# omni for GPU clusters: NVIDIA's NGC PyTorch image (CUDA, NCCL, cuDNN, a matching torch and
# Transformer Engine) plus omni with the `hf` extra (and the `gpu` extra only where the base lacks
# Transformer Engine, see the RUN step). Build:
#   docker build -t omni:latest .
# Run (the entrypoint is `omni`; mount the folder holding your recipes, data and runs):
#   docker run --gpus all -v $PWD:/work -w /work omni:latest train recipe.yaml ...
# Several GPUs of one node: replace the entrypoint with omni's torchrun (torchrun's arguments; a
# `docker stop` SIGTERM then makes every process save a checkpoint and the container exit 0):
#   docker run --gpus all --ipc=host -v $PWD:/work -w /work --entrypoint python omni:latest \
#     -m omni.parallel.launch --standalone --nproc_per_node 8 -m omni train recipe.yaml parallel.strategy=fsdp ...
# (--ipc=host: NCCL between the processes needs more shared memory than Docker's 64 MB /dev/shm. torchrun
# sets OMP_NUM_THREADS=1 per process unless it is set; the image sets no thread count, so pass
# `-e OMP_NUM_THREADS=N` to choose one for your cores per GPU.)
# (Slurm launch through `omni launch slurm` is planned, issue #22; see docs/architecture.md.)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/omni
COPY pyproject.toml README.md ./
COPY omni omni
COPY tokenizers tokenizers
COPY decoders decoders
COPY parallel parallel
COPY eval eval
COPY recipes recipes

# The base image pins torch (PIP_CONSTRAINT) and ships its own Transformer Engine, built for its
# CUDA and torch. The `gpu` extra is an unpinned `transformer-engine[pytorch]`: pip could replace
# that build or compile another from source, so it is installed only where the base has none.
# Presence is checked with find_spec, not an import: importing Transformer Engine loads CUDA
# libraries, and `docker build` runs without a GPU.
RUN if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('transformer_engine') is None)"; then \
        echo "base image ships Transformer Engine: keeping it" && extras="hf"; \
    else \
        echo "base image has no Transformer Engine: installing the gpu extra" && extras="gpu,hf"; \
    fi && \
    pip install --no-cache-dir ".[${extras}]" && omni --version

ENTRYPOINT ["omni"]
CMD ["--help"]
