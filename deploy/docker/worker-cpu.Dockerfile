# syntax=docker/dockerfile:1
# A CPU worker with the bundled tiny model. Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t flowfarm/worker-cpu .

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# aws-lc-sys (rustls' crypto provider, pulled in by object_store's S3 client)
# falls back to a CMake build where its plain cc build does not cover the target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY migrations migrations
COPY crates crates
COPY tests tests
# No target-cpu=native: the engine picks its AVX-512 / AVX2 kernels at run
# time, so one generic x86-64 binary runs at full speed on every host.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=flowfarm-target-cpu \
    cargo build --release --locked --bin flowfarm \
 && install -m 0755 target/release/flowfarm /usr/local/bin/

FROM debian:${DEBIAN_RELEASE}-slim
# CA roots for S3 over HTTPS (object_store verifies against the system store).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Same uid as the coordinator image: compose's token volume is written there
# and read here.
RUN groupadd --system --gid 10001 flowfarm \
 && useradd --system --uid 10001 --gid flowfarm --home-dir /var/lib/flowfarm --shell /usr/sbin/nologin flowfarm \
 && install -d -o flowfarm -g flowfarm /var/lib/flowfarm /var/lib/flowfarm/results /run/flowfarm/token
COPY --from=builder /usr/local/bin/flowfarm /usr/local/bin/flowfarm
COPY models/flowfarm-tiny /opt/flowfarm/models/flowfarm-tiny
COPY deploy/docker/worker-cpu.toml /etc/flowfarm/worker.toml
ENV FLOWFARM_WORKER_CONFIG=/etc/flowfarm/worker.toml \
    FLOWFARM_METRICS_LISTEN=0.0.0.0:9465
USER 10001:10001
WORKDIR /var/lib/flowfarm
# Prometheus /metrics (served once the worker has registered).
EXPOSE 9465
ENTRYPOINT ["flowfarm"]
CMD ["worker"]
