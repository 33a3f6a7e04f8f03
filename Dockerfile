# mocoserve's serving image on NVIDIA GPUs: the HTTP service with its /ui page, embedding,
# search, index tools and k-NN reports (ONNX Runtime + FAISS); no torch, no training stack.
#   docker build -t mocoserve .
#   docker run --gpus all --rm -p 8000:8000 -v "$PWD:/data" mocoserve   (serve /data/out.faiss)
# Two stages: the build stage installs into a venv; the runtime stage copies only the venv.
# Training and export need the [train] extra: pip install '.[all]' on a machine with torch.

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mocoserve ./mocoserve
COPY train ./train
COPY export ./export
COPY app ./app
# the serving extras only: [serve] (FastAPI, uvicorn) and [app] (Gradio, for /ui)
RUN pip install --no-cache-dir '.[serve,app]'

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 mocoserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER mocoserve
WORKDIR /home/mocoserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
ENTRYPOINT ["mocoserve"]
# the serving command: an index made by `mocoserve embed` mounted at /data
CMD ["serve", "--index", "/data/out.faiss", "--host", "0.0.0.0", "--port", "8000"]
