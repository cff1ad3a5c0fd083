# syntax=docker/dockerfile:1
# A GPU worker (NVIDIA, CUDA) with the bundled tiny model. Build from the
# repository root; no GPU is needed to build:
#   docker build -f deploy/docker/worker-cuda.Dockerfile \
#     --build-arg CUDA_COMPUTE_CAP=90 -t flowfarm/worker-cuda .
#
# The kernels (candle's and the engine's softmax) ship as PTX that the driver
# compiles when a model loads, and a driver refuses PTX from a newer toolkit
# than its own: keep CUDA_VERSION at or below the CUDA version `nvidia-smi`
# reports on the GPU hosts.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder
ARG RUST_VERSION=1.95.0
# The GPU generation to build for (90: H100/H200, 89: L4/L40S, 80: A100, 86:
# A10/RTX 30xx). The build has no GPU to ask, and candle's kernel build and
# the engine's build.rs both read this variable.
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential cmake pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY migrations migrations
COPY crates crates
COPY tests tests
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
# The feature lives on the flowfarm package, so the package is named. Both
# kernel builds (candle's and the engine's) rerun when CUDA_COMPUTE_CAP
# changes, so one target cache serves every compute capability.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=flowfarm-target-cuda \
    cargo build --release --locked -p flowfarm --features cuda --bin flowfarm \
 && install -m 0755 target/release/flowfarm /usr/local/bin/

# The runtime image carries cuBLAS, cuRAND and NVRTC, which candle opens at
# run time; libcuda itself comes from the host driver through the NVIDIA
# container toolkit.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Same uid as the other images. The home folder holds the driver's PTX JIT
# cache (~/.nv), which saves recompiling every kernel on each start.
RUN groupadd --system --gid 10001 flowfarm \
 && useradd --system --uid 10001 --gid flowfarm --home-dir /var/lib/flowfarm --shell /usr/sbin/nologin flowfarm \
 && install -d -o flowfarm -g flowfarm /var/lib/flowfarm /var/lib/flowfarm/results /run/flowfarm/token
COPY --from=builder /usr/local/bin/flowfarm /usr/local/bin/flowfarm
COPY models/flowfarm-tiny /opt/flowfarm/models/flowfarm-tiny
COPY deploy/docker/worker-cuda.toml /etc/flowfarm/worker.toml
ENV FLOWFARM_WORKER_CONFIG=/etc/flowfarm/worker.toml \
    FLOWFARM_METRICS_LISTEN=0.0.0.0:9465
USER 10001:10001
WORKDIR /var/lib/flowfarm
# Prometheus /metrics (served once the worker has registered).
EXPOSE 9465
ENTRYPOINT ["flowfarm"]
CMD ["worker"]
