# Image for pretraining on GPU clusters: CUDA devel toolchain, PyTorch, DeepSpeed with its
# fused CUDA/CPU ops compiled at build time, optionally NVIDIA apex, and this project.
#
#   docker build -t vitssl:latest .
#   docker build --build-arg BUILD_APEX=1 --build-arg TORCH_CUDA_ARCH_LIST="9.0" -t vitssl .
#
# Under Slurm run it with enroot/pyxis (srun --container-image) or convert it for
# Apptainer; see slurm/README.md. The CUDA image, the torch wheel index and the GPU
# architectures are build arguments: keep the CUDA version of the image and of the torch
# wheels equal (cu128 wheels on a CUDA 12.8 image), since DeepSpeed's ops are compiled
# with the image's nvcc against torch's CUDA runtime.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEEPSPEED_VERSION=0.19.8
# Ampere (A100), Ada (L40S), Hopper (H100/H200).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG BUILD_APEX=0
ARG USER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential ninja-build git ca-certificates \
        libaio-dev libgl1 libglib2.0-0 libjpeg-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv ${VIRTUAL_ENV} \
    && pip install --upgrade pip setuptools wheel packaging

RUN pip install --index-url ${TORCH_INDEX_URL} \
        torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}

# DeepSpeed's fused Adam/LAMB (GPU), CPU Adam (ZeRO offload) and the flatten/unflatten
# utils, compiled now instead of JIT-compiled by every rank at the first run.
RUN DS_BUILD_OPS=0 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_FUSED_LAMB=1 \
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_UTILS=1 \
    pip install --no-build-isolation deepspeed==${DEEPSPEED_VERSION} \
    && ds_report

# Optional: apex from source (fused layer norm and optimizers), when BUILD_APEX=1.
RUN if [ "${BUILD_APEX}" = "1" ]; then \
        pip install -v --no-build-isolation \
            --config-settings "--build-option=--cpp_ext" \
            --config-settings "--build-option=--cuda_ext" \
            git+https://github.com/NVIDIA/apex.git ; \
    fi

# The project itself (sources only: no .venv, runs or data from the build context),
# installed in editable mode so that ds_configs/ and recipes are found beside the code.
WORKDIR /opt/vitssl
COPY pyproject.toml README.md LICENSE Makefile ./
COPY train ./train
COPY models ./models
COPY data_pipelines ./data_pipelines
COPY ds_configs ./ds_configs
COPY slurm ./slurm
# vitssl/ holds links to the folders above: the one import name (see the README)
COPY vitssl ./vitssl
RUN pip install -e ".[eval,export]" \
    && python -c "import vitssl.train, vitssl.models, vitssl.data_pipelines, deepspeed, timm; print('import ok')"

# Run as an unprivileged user; enroot/pyxis and Apptainer run as the calling user anyway.
RUN useradd --create-home --uid ${USER_UID} --shell /bin/bash ssl \
    && mkdir -p /workspace \
    && chown ssl:ssl /workspace
USER ssl
WORKDIR /workspace

CMD ["python", "-m", "vitssl.train.pretrain", "--help"]
