# syntax=docker/dockerfile:1
#
# One image with the three VICTOR binaries: victor-controller, victor-fe-agent, victorctl.
# The Helm chart (helm/victor) runs `victor-controller` from this image as user 10001.
#
#   docker build -t registry.example/victor:0.1.0 .
#
# Stage 1 builds release binaries with the workspace's pinned dependencies (Cargo.lock); protoc is
# vendored by the build, so the builder needs nothing beyond the Rust image. Stage 2 is a slim
# Debian of the same release (same glibc) with the binaries only.
#
# CI builds stage 2 without a Docker engine from this file (packaging/image/build-image.sh, via
# packaging/image/dockerfile.py, which refuses instructions it does not reproduce) and runs it as
# the Helm chart does: keep the runtime stage to RUN, COPY --from=build /out/<binary>, EXPOSE,
# USER, CMD, ENV, LABEL and WORKDIR, or teach that reader first.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target dir between builds (BuildKit); the binaries are
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin victor-controller --bin victor-fe-agent --bin victorctl \
    && mkdir -p /out \
    && cp target/release/victor-controller target/release/victor-fe-agent target/release/victorctl /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to etcd/controllers with public CAs; iproute2: `ip` for operators debugging
# an fe-agent container (the agent itself talks rtnetlink directly).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates iproute2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 victor \
    && useradd --system --uid 10001 --gid victor --no-create-home --shell /usr/sbin/nologin victor
COPY --from=build /out/victor-controller /usr/local/bin/
COPY --from=build /out/victor-fe-agent /usr/local/bin/
COPY --from=build /out/victorctl /usr/local/bin/
# gRPC (agents, orchestrators) and HTTP admin (/healthz, /readyz, /metrics) of the controller.
EXPOSE 50051 8080
# The controller runs unprivileged. victor-fe-agent programs the host's routes and captures ARP:
# run it with `--user 0 --network host --cap-add NET_ADMIN --cap-add NET_RAW`.
USER 10001:10001
CMD ["victor-controller", "--help"]
