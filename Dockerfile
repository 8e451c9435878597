# One image for every Prism component; docker-compose.yml picks the command per service.
#   docker build -t prism:local .
#   docker run -p 8080:8080 prism:local            # the whole stack in one container (demo)
# Linux images use mlx[cpu] (pyproject's marker); no torch: it is a test-only dependency.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf \
    PRISM_HOME=/data/prism

WORKDIR /app
# Dependencies first, so editing code does not re-install them (layer cache).
COPY pyproject.toml README.md ./
RUN mkdir -p shared services protos/prism \
    && touch shared/__init__.py services/__init__.py protos/prism/__init__.py \
    && pip install . \
    && pip uninstall -y prism \
    && rm -rf shared services protos
COPY shared shared
COPY services services
COPY protos protos
RUN pip install --no-deps .

# Writable mount points owned by the unprivileged user; named volumes inherit the ownership.
RUN useradd --create-home --uid 1000 prism \
    && mkdir -p /data/hf /data/prism /data/models /data/cache \
    && chown -R prism:prism /data
USER prism
WORKDIR /data/models

EXPOSE 8080 50051 50052 50053
CMD ["python", "-m", "services.launcher", "--host", "0.0.0.0", "--gateway-port", "8080"]
