# syntax=docker/dockerfile:1
#
# comfy-worker on top of worker-comfyui's base image (ComfyUI + CUDA, no models).
#   docker build -t comfy-worker .
#   docker build --build-arg WORKER_COMFYUI_VERSION=5.8.5 -t comfy-worker .
# Add models and custom nodes in your own image FROM this one, exactly as with worker-comfyui
# (comfy-node-install, comfy model download, or a network volume).

ARG WORKER_COMFYUI_VERSION=5.8.5
ARG RUST_VERSION=1.95

# Build stage. Pinned to Debian bookworm (glibc 2.36): the binary must run on the Ubuntu 24.04
# (glibc 2.39) base below; newer rust:1 images are trixie (glibc 2.41) and would not.
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# aws-lc-sys (rustls' crypto) builds C; cmake and perl cover the platforms without prebuilt bindings.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake perl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# The build context is filtered by .dockerignore (no target/, .git/ or tests/); it keeps crates/,
# whose members the workspace manifest needs even when they are not built.
# Features: Lambda mode (`lambda`), so the image also runs on AWS Lambda, but not the built-in
# ComfyUI simulator (`simulator`, a default feature, with `simulate-comfyui` and `--simulate`):
# the image runs a real ComfyUI.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --no-default-features --features lambda --bin comfy-worker \
    && cp target/release/comfy-worker /usr/local/bin/comfy-worker

# Runtime: worker-comfyui's base image, with our worker and start script in place of its handler.
FROM runpod/worker-comfyui:${WORKER_COMFYUI_VERSION}-base
COPY --from=builder /usr/local/bin/comfy-worker /usr/local/bin/comfy-worker
COPY docker/start.sh /start.sh
COPY test_input.json /test_input.json
RUN chmod +x /start.sh /usr/local/bin/comfy-worker
WORKDIR /
CMD ["/start.sh"]
