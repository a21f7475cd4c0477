# eventful-serve. CPU by default:
#   docker build -t eventful-serve .
# CUDA: a PyTorch CUDA runtime image as the base (it ships torch; nothing else is installed over it):
#   docker build -t eventful-serve:cuda --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime .
# Weights are not baked in: mount a weights directory at /weights (--model /weights/...) or let a Hugging Face id
# resolve through the cache volume at /cache/huggingface.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    EVENTFUL_HOST=0.0.0.0 \
    EVENTFUL_PORT=8000

WORKDIR /app
# torch first and pinned. On the default (CPU) base: the CPU wheel (no CUDA packages). On a PyTorch CUDA base,
# torch is already there and is kept (the check skips the install).
RUN python -c "import torch" 2>/dev/null \
    || pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY clients ./clients
COPY bench ./bench
RUN pip install . && python -c "import torch, server.app; print('torch', torch.__version__)"

RUN useradd --create-home --uid 10001 eventful \
    && mkdir -p /weights /cache/huggingface \
    && chown -R eventful:eventful /weights /cache
USER eventful
VOLUME ["/weights", "/cache/huggingface"]
EXPOSE 8000

# /healthz answers once the model is loaded (the port opens after loading); start-period covers the load.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EVENTFUL_PORT', '8000'), timeout=2)"

ENTRYPOINT ["eventful-serve"]
CMD []
