# brainscan segmentation worker (Celery, queue "segmentation"): TensorFlow CPU by default.
# Build from the repository root: docker build -f docker/segmenter-worker.Dockerfile -t brainscan-segmenter-worker .
# NVIDIA GPUs: --build-arg BRAINSCAN_EXTRAS=gpu,serve installs tensorflow[and-cuda] (CUDA and cuDNN
# come as pip wheels; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit).
# docker-compose.yml builds that variant for the `segmenter-worker-gpu` service (profile "gpu").
FROM python:3.11-slim
ARG BRAINSCAN_EXTRAS=cpu,serve
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    TF_CPP_MIN_LOG_LEVEL=2 \
    BRAINSCAN_MODELS=/models \
    SEGMENTER_JOBS_DIR=/var/lib/brainscan/jobs
WORKDIR /app

# Dependencies first (a layer that survives code changes), from a stub package that is removed.
COPY pyproject.toml README.md LICENSE ./
RUN case "$BRAINSCAN_EXTRAS" in cpu,serve|gpu,serve) ;; \
      *) echo "BRAINSCAN_EXTRAS must be cpu,serve or gpu,serve, got '$BRAINSCAN_EXTRAS'" >&2; exit 1 ;; esac \
 && mkdir brainscan && touch brainscan/__init__.py \
 && pip install --no-cache-dir ".[$BRAINSCAN_EXTRAS]" \
 && pip uninstall --yes brainscan \
 && rm -rf brainscan build ./*.egg-info

COPY brainscan/ ./brainscan/
COPY serving/ ./serving/
COPY services/__init__.py ./services/__init__.py
COPY services/segmenter/ ./services/segmenter/

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin brainscan \
 && mkdir -p /var/lib/brainscan/jobs \
 && chown -R 10001:10001 /var/lib/brainscan
USER 10001

# No port: the worker only talks to Redis. Healthy when this node answers a broker ping.
HEALTHCHECK --interval=30s --timeout=15s --start-period=180s --retries=3 \
  CMD celery -A services.segmenter.worker inspect ping --destination "celery@$HOSTNAME" --timeout 10 >/dev/null || exit 1
CMD ["celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation", "-c", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
