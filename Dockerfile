# syntax=docker/dockerfile:1
#
# midas-serve container image.
#
#   CPU (default, flex + ndarray):  docker build -t midas-serve .
#   GPU (wgpu on Vulkan, e.g. Cloud Run's NVIDIA L4):
#       docker build --target runtime-gpu --build-arg FEATURES="flex wgpu" -t midas-serve:gpu .
#   Weights baked in (converted to .bpk by model-import during the build):
#       docker build --build-arg WEIGHTS=weights/midas_v21_small_256.pt .   (a file in the context)
#       docker build --build-arg WEIGHTS=https://example.com/midas.pt --build-arg WEIGHTS_SHA256=... .
#   Without WEIGHTS the image fetches them at start-up from MIDAS_WEIGHTS (gs://, https:// or a path).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency graph alone, so that the dependency layer below is rebuilt only when it changes.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG FEATURES="flex ndarray avx512"
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --profile dist --no-default-features --features "$FEATURES" \
      --recipe-path recipe.json -p midas-serve -p model-import
COPY . .
RUN cargo build --profile dist --locked --no-default-features --features "$FEATURES" \
      -p midas-serve -p model-import \
    && mkdir -p /out/weights \
    && cp target/dist/midas-serve target/dist/model-import /out/

# Optional: bake weights into the image as a verified .bpk.
ARG WEIGHTS=""
ARG WEIGHTS_SHA256=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [[ -z "$WEIGHTS" ]]; then exit 0; fi; \
    source="$WEIGHTS"; \
    if [[ "$WEIGHTS" == https://* ]]; then \
      source=/tmp/weights.download; \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends curl=7.88.* ca-certificates=20* >/dev/null; \
      curl -fsSL "$WEIGHTS" -o "$source"; \
    fi; \
    if [[ -n "$WEIGHTS_SHA256" ]]; then echo "$WEIGHTS_SHA256  $source" | sha256sum -c -; fi; \
    /out/model-import "$source" -o /out/weights/midas.bpk

# GPU runtime: wgpu needs the Vulkan loader; the NVIDIA driver and its ICD come from the host.
FROM debian:bookworm-slim AS runtime-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20* libvulkan1=1.3.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --home-dir /var/lib/midas-serve --create-home midas
ARG WEIGHTS=""
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    MIDAS_BACKEND=wgpu \
    MIDAS_WEIGHTS=${WEIGHTS:+/opt/midas-serve/weights/midas.bpk} \
    MIDAS_STORE=/var/lib/midas-serve/data \
    PORT=8080
COPY --from=builder /out/midas-serve /usr/local/bin/midas-serve
COPY --from=builder --chown=65532:65532 /out/weights /opt/midas-serve/weights
USER 65532
WORKDIR /var/lib/midas-serve
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/midas-serve", "serve"]

# CPU runtime (the default target): glibc, libgcc and CA certificates, no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-cpu
ARG WEIGHTS=""
ENV MIDAS_BACKEND=flex \
    MIDAS_WEIGHTS=${WEIGHTS:+/opt/midas-serve/weights/midas.bpk} \
    MIDAS_STORE=/home/nonroot/data \
    PORT=8080
COPY --from=builder /out/midas-serve /usr/local/bin/midas-serve
COPY --from=builder --chown=65532:65532 /out/weights /opt/midas-serve/weights
WORKDIR /home/nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/midas-serve", "serve"]
