# A static (musl) release binary on an empty base: the image holds kreboot and nothing else.
FROM rust:1-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools
WORKDIR /src
COPY . .
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --bin kreboot

FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kreboot /kreboot
ENTRYPOINT ["/kreboot"]
CMD ["agent"]
