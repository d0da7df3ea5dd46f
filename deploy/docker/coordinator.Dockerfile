# syntax=docker/dockerfile:1
# The coordinator image. Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t cohort-coordinator .
# The coordinator does not link libtorch, so the runtime image is a slim
# Debian with one static-ish binary (SQLite is bundled; no OpenSSL, no TLS yet).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir because cache mounts are not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cohort-coordinator --bin cohort-coordinator \
    && install -D -m 0755 target/release/cohort-coordinator /out/cohort-coordinator

FROM ${RUNTIME_IMAGE}
# A fixed non-root uid, so that a Kubernetes fsGroup/runAsUser can match it.
RUN groupadd --system --gid 10001 cohort \
    && useradd --system --uid 10001 --gid cohort --home-dir /var/lib/cohort --create-home cohort
COPY --from=builder /out/cohort-coordinator /usr/local/bin/cohort-coordinator
USER 10001:10001
WORKDIR /var/lib/cohort
# Every flag has a COHORT_* variable; these are the container defaults.
ENV COHORT_LISTEN=0.0.0.0:50051 \
    COHORT_LOG_FORMAT=json \
    COHORT_RUN_DIR=/var/lib/cohort/run
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/cohort-coordinator"]
CMD ["run"]
