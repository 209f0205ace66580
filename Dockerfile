# Build: docker build -t loka-stratum .
# Run:   docker run -p 3333:3333 -p 9090:9090 loka-stratum --pool stratum+tcp://pool.example.com:3333 \
#            --pool-user ACCOUNT
# There is no default pool: give one with --pool (the arguments replace CMD, so repeat --listen and
# --http-listen as needed), with LOKA_ environment variables, or with a config mounted at
# /etc/loka-stratum/loka-stratum.toml and `run --config /etc/loka-stratum/loka-stratum.toml`.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin loka-stratum

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin loka-stratum \
    && install -d -o loka-stratum -g loka-stratum -m 0700 /var/lib/loka-stratum
COPY --from=builder /src/target/release/loka-stratum /usr/local/bin/loka-stratum
COPY config/loka-stratum.toml /etc/loka-stratum/loka-stratum.toml
# The worker inventory (workers.redb): mount a volume here to keep it across containers.
ENV LOKA_INVENTORY__DATA_DIR=/var/lib/loka-stratum
VOLUME /var/lib/loka-stratum
USER loka-stratum
EXPOSE 3333 9090
ENTRYPOINT ["/usr/local/bin/loka-stratum"]
CMD ["run", "--listen", "0.0.0.0:3333", "--http-listen", "0.0.0.0:9090"]
