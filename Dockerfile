# pgshield as a small container: build with the Rust image, run on Debian slim as a
# non-root user. Configure by mounting a file at /etc/pgshield/pgshield.toml, or by
# environment alone (PGSHIELD__SECTION__KEY=value); see README "Running as a sidecar".

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# (Not built, but the manifest names it: cargo refuses a manifest whose bench is missing.)
COPY benches ./benches
RUN cargo build --release --locked --bin pgshield \
 && strip target/release/pgshield

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgshield \
 && mkdir -p /etc/pgshield
COPY --from=build /src/target/release/pgshield /usr/local/bin/pgshield
COPY config/pgshield.toml /etc/pgshield/pgshield.example.toml
USER pgshield
# Inside a container, listen on every interface (override with -e PGSHIELD__LISTEN__ADDR=…),
# and serve /metrics, /health and /ready where probes and Prometheus can reach them.
ENV PGSHIELD__LISTEN__ADDR=0.0.0.0:6432 \
    PGSHIELD__ADMIN__HTTP_LISTEN=0.0.0.0:9930
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/pgshield"]
CMD ["run"]
