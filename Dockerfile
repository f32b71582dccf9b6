# syntax=docker/dockerfile:1
# kreboot's image: one static (musl) release binary on an empty base. Nothing else is in it: no
# shell, no package manager, no libc. Host commands (systemctl) run in the host's namespaces.
#
#   docker build -t kreboot:0.1.0 .
#
# The build is reproducible from Cargo.lock (--locked) with the toolchain pinned below.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --locked --release --target x86_64-unknown-linux-musl --bin kreboot \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release --target x86_64-unknown-linux-musl --bin kreboot \
 && cp target/x86_64-unknown-linux-musl/release/kreboot /kreboot

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kreboot" \
      org.opencontainers.image.description="Reboots Kubernetes nodes safely after the host installs updates that need a reboot" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kreboot/kreboot" \
      org.opencontainers.image.documentation="https://github.com/kreboot/kreboot/blob/main/README.md"
# For HTTPS notification webhooks; the API server's CA comes from the ServiceAccount mount.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /kreboot /kreboot
# Root, because entering the host's namespaces needs CAP_SYS_ADMIN, CAP_SYS_CHROOT and
# CAP_SYS_PTRACE; the DaemonSet drops every other capability and keeps the root FS read-only.
USER 0:0
ENTRYPOINT ["/kreboot"]
CMD ["agent"]
