# Multi-stage build: compile in the Rust image, run in a slim Debian image as a non-root user.
# Build:  docker build -t edgecache .
# Run:    docker run -p 8080:8080 edgecache     (misses go to http://origin:80: README, "Deployment")
# Demo:   docker run -p 8080:8080 -p 9090:9090 edgecache demo --http 0.0.0.0:8080 --https 0.0.0.0:8443 --admin 0.0.0.0:9090
# CI lints this file with hadolint; the image itself is built where base images can be pulled.
FROM rust:1-bookworm AS build
# etcd-client's build script runs protoc to generate etcd's gRPC code. Not pinned: Debian's
# point releases replace the version within bookworm, and a pin would break the build then.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
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
# A numeric user, so Kubernetes' runAsNonRoot can check it (deploy/kubernetes/deployment.yaml).
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin edgecache
COPY --from=build /src/target/release/edgecache /usr/local/bin/edgecache
# Listens on 0.0.0.0; its origin is http://origin:80, not 127.0.0.1 (the container itself).
COPY deploy/container/edgecache.toml /etc/edgecache/edgecache.toml
USER 10001:10001
EXPOSE 8080 8443 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/edgecache"]
CMD ["run", "--config", "/etc/edgecache/edgecache.toml"]
