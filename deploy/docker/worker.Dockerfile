# syntax=docker/dockerfile:1
# The worker image: cohort-worker linked against PyTorch 2.11.0's libtorch,
# CUDA included. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t cohort-worker .
#
# torch 2.11.0 from PyPI ships its own CUDA 13 libraries (nvidia-* wheels);
# the host needs only an NVIDIA driver that supports CUDA 13 and the NVIDIA
# container toolkit. worker/build.rs links libtorch_cuda.so explicitly and
# sets an rpath to torch's lib/ in the builder's virtualenv, so the runtime
# stage puts that virtualenv at the same path and needs no LD_LIBRARY_PATH.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.11.0

FROM ${RUST_IMAGE} AS builder
ARG TORCH_VERSION
# g++ compiles torch-sys's C++ shim against torch's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/cohort/venv
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}" \
    LIBTORCH_USE_PYTORCH=1
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cohort-worker --bin cohort-worker \
    && install -D -m 0755 target/release/cohort-worker /out/cohort-worker

FROM ${CUDA_IMAGE}
# Only torch's shared libraries are used at run time (no Python), but they sit
# where the rpath baked into the binary points: the same virtualenv path.
COPY --from=builder /opt/cohort/venv /opt/cohort/venv
COPY --from=builder /out/cohort-worker /usr/local/bin/cohort-worker
# Fail the build if the rpath does not resolve libtorch_cuda.so in this image
# (without it the worker would silently see no GPU).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ldd /usr/local/bin/cohort-worker | tee /dev/stderr \
    | grep -q 'libtorch_cuda\.so => /opt/cohort/venv/'
RUN groupadd --system --gid 10001 cohort \
    && useradd --system --uid 10001 --gid cohort --home-dir /var/lib/cohort --create-home cohort
USER 10001:10001
WORKDIR /var/lib/cohort
ENV COHORT_LOG_FORMAT=json \
    COHORT_DEVICE=cuda:0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["/usr/local/bin/cohort-worker"]
CMD ["pretrain"]
