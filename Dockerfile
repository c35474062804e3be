# Multi-stage build of udp-director: build in the Rust image, run from a distroless base with no
# shell or build tools, as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin udp-director \
 && cp target/release/udp-director /udp-director

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /udp-director /usr/local/bin/udp-director
# 9000/tcp queries, 7777/udp data, 9090/tcp admin (metrics, health, sessions).
EXPOSE 9000/tcp 7777/udp 9090/tcp
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/udp-director"]
CMD ["--config", "/etc/udp-director/config.yaml"]
