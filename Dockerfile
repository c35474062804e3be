# syntax=docker/dockerfile:1
# udp-director image: built in the Rust image, run from distroless (glibc and libgcc only: no
# shell, no package manager, no build tools), as uid 65532 with no capabilities. Data ports below
# 1024 need CAP_NET_BIND_SERVICE, granted by the pod spec (deploy/components/privileged-ports).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and incremental state between builds without baking them into
# a layer; the binary is copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin udp-director \
 && cp target/release/udp-director /udp-director

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /udp-director /usr/local/bin/udp-director
# 9000/tcp queries, 7777/udp data, 9090/tcp admin (metrics, health, sessions).
EXPOSE 9000/tcp 7777/udp 9090/tcp
# Numeric, so the kubelet can verify runAsNonRoot.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/udp-director"]
CMD ["--config", "/etc/udp-director/config.yaml"]
