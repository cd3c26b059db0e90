# brainscan segmenter API (internal, port 8102): validates uploads, stores them, enqueues jobs.
# It never imports TensorFlow (jobs are enqueued by task name), so the image has none.
# Build from the repository root: docker build -f docker/segmenter-api.Dockerfile -t brainscan-segmenter-api .
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    BRAINSCAN_MODELS=/models \
    SEGMENTER_JOBS_DIR=/var/lib/brainscan/jobs
WORKDIR /app

# Dependencies first (a layer that survives code changes), from a stub package that is removed.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir brainscan && touch brainscan/__init__.py \
 && pip install --no-cache-dir '.[serve]' \
 && pip uninstall --yes brainscan \
 && rm -rf brainscan build ./*.egg-info

COPY brainscan/ ./brainscan/
COPY serving/ ./serving/
COPY services/__init__.py ./services/__init__.py
COPY services/segmenter/ ./services/segmenter/

# The job store is a named volume shared with the workers; a fresh volume takes the owner of
# this folder, so the non-root user can write to it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin brainscan \
 && mkdir -p /var/lib/brainscan/jobs \
 && chown -R 10001:10001 /var/lib/brainscan
USER 10001

EXPOSE 8102
# /readyz: job store writable, broker reachable, at least one segmentation bundle
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8102/readyz', timeout=4)"]
CMD ["uvicorn", "services.segmenter.app:app", "--host", "0.0.0.0", "--port", "8102", "--no-access-log", "--timeout-graceful-shutdown", "10"]
