# Multi-stage build: compile in the Rust image, run in a slim Debian image as a non-root user.
# Build:  docker build -t edgecache .
# Run:    docker run -p 8080:8080 -v $PWD/config:/etc/edgecache:ro edgecache
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
COPY config ./config
# No .git is copied: pass the commit for --version, /status and edgecache_build_info with
# docker build --build-arg EDGECACHE_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG EDGECACHE_COMMIT=unknown
RUN cargo build --release --locked --bin edgecache

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin edgecache
COPY --from=build /src/target/release/edgecache /usr/local/bin/edgecache
COPY config/edgecache.toml /etc/edgecache/edgecache.toml
USER edgecache
EXPOSE 8080 8443
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/edgecache"]
CMD ["run", "--config", "/etc/edgecache/edgecache.toml"]
