# One image for the API, the worker and the migrations. On Linux, PyPI's torch wheel is the CUDA build.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A named volume copies the ownership of the folder it is mounted on, on first use: create the mount points
# owned by the user that writes there, or the worker cannot write images or download models.
RUN useradd --create-home --uid 1000 nightrender \
    && mkdir -p /data/outputs /models/hf \
    && chown -R nightrender:nightrender /data /models
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY jobs ./jobs
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
# Editable, so the migrations are found beside the packages (jobs/migrate.py). The second command fails the
# build if the `nightrender` entry point that compose runs is missing or cannot import.
RUN pip install -e . && nightrender --help >/dev/null
USER nightrender
CMD ["nightrender", "--help"]
