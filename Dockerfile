# One image for the API, the worker and the migrations. On Linux, PyPI's torch wheel is the CUDA build.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY jobs ./jobs
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install -e . && useradd --create-home nightrender && mkdir -p /data /models \
    && chown nightrender /data /models
USER nightrender
