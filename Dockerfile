# CPU image by default.  For CUDA: --build-arg TORCH_INDEX=https://pypi.org/simple (PyPI's Linux
# torch wheel is the CUDA build, for any torch version), then run with --gpus all and
# `--device cuda` for the cosyvoice2 engine.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from the index that matches the image (an unpinned torch from PyPI is a CUDA build)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY realtime ./realtime
COPY cosyvoice ./cosyvoice
COPY web_client ./web_client
RUN pip install .

RUN useradd --create-home --uid 10001 app
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os,sys,urllib.request as u; r=u.Request('http://127.0.0.1:8000/health', headers={'X-API-TOKEN': os.environ.get('REALTIME_TOKEN', '')}); sys.exit(u.urlopen(r).status != 200)"
ENTRYPOINT ["realtime", "serve", "--host", "0.0.0.0", "--port", "8000"]
