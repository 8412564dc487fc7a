# gpt-serve: build with the Rust toolchain, run on a slim Debian with the
# default model inside. Configuration by GPT_SERVE_* environment variables
# (see `gpt-serve serve --help`).
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: source edits do not rebuild them.
# research/ is a workspace member the image never builds: its manifest and an
# empty lib are enough for cargo to read the workspace.
COPY Cargo.toml Cargo.lock ./
COPY research/Cargo.toml research/Cargo.toml
RUN mkdir src research/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs research/src/lib.rs \
    && cargo build --release --locked --bin gpt-serve && rm -rf src
COPY src src
# The release profile keeps debug info (for profiling); the image does not need
# it: stripping takes the binary from ~130 MB to ~15 MB.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin gpt-serve \
    && strip target/release/gpt-serve

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home gptserve
COPY --from=build /src/target/release/gpt-serve /usr/local/bin/gpt-serve
# Readable by the non-root user whatever the checkout's modes; set while
# copying (a separate `chmod -R` layer would store the model twice).
COPY --chmod=755 models/default /models/default
ENV GPT_SERVE_HOST=0.0.0.0 \
    GPT_SERVE_PORT=8000 \
    GPT_SERVE_MODEL=/models/default \
    GPT_SERVE_MODEL_ID=default
USER gptserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s CMD ["gpt-serve", "healthcheck"]
# gpt-serve handles SIGTERM: stops accepting, finishes in-flight requests.
ENTRYPOINT ["gpt-serve"]
CMD ["serve"]
