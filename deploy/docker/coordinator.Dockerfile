# syntax=docker/dockerfile:1
# The coordinator and farmctl. Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t flowfarm/coordinator .

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# aws-lc-sys (rustls' crypto provider, pulled in by object_store's S3 client)
# falls back to a CMake build where its plain cc build does not cover the target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads: every workspace member must be present for cargo
# to load the workspace, and flowfarm-proto's build script compiles ../../proto.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY migrations migrations
COPY crates crates
COPY tests tests
# The target folder is a cache mount, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=flowfarm-target-cpu \
    cargo build --release --locked --bin flowfarm --bin farmctl \
 && install -m 0755 target/release/flowfarm target/release/farmctl /usr/local/bin/

FROM debian:${DEBIAN_RELEASE}-slim
# CA roots for S3 over HTTPS (object_store verifies against the system store).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid so Kubernetes' runAsNonRoot can check it, and so volumes shared
# with the worker images (compose's token volume) have one owner.
# /run/flowfarm/token exists here so that a fresh named volume mounted on it
# inherits the flowfarm owner (compose's worker-token job writes into it).
RUN groupadd --system --gid 10001 flowfarm \
 && useradd --system --uid 10001 --gid flowfarm --home-dir /var/lib/flowfarm --shell /usr/sbin/nologin flowfarm \
 && install -d -o flowfarm -g flowfarm /var/lib/flowfarm /var/lib/flowfarm/results /run/flowfarm/token
COPY --from=builder /usr/local/bin/flowfarm /usr/local/bin/farmctl /usr/local/bin/
COPY config/flowfarm.toml /etc/flowfarm/flowfarm.toml
# The example config listens on loopback only, which nothing outside the
# container could reach; the environment overrides win over the file. The
# coordinator then refuses to start without [server.tls]
# (FLOWFARM_SERVER__TLS__CERT_FILE and FLOWFARM_SERVER__TLS__KEY_FILE) or
# FLOWFARM_SERVER__ALLOW_PLAINTEXT=true: the deployment chooses (compose and
# Kubernetes do), since the image cannot know which is safe.
ENV FLOWFARM_CONFIG=/etc/flowfarm/flowfarm.toml \
    FLOWFARM_LISTEN=0.0.0.0:7070 \
    FLOWFARM_METRICS_LISTEN=0.0.0.0:9464 \
    FLOWFARM_STATUS__LISTEN=0.0.0.0:8080 \
    FLOWFARM_RESULTS_DIR=/var/lib/flowfarm/results
USER 10001:10001
WORKDIR /var/lib/flowfarm
# gRPC (API, health, reflection), the status page (HTTPS with [server.tls])
# and Prometheus /metrics.
EXPOSE 7070 8080 9464
ENTRYPOINT ["flowfarm"]
CMD ["coordinator"]
