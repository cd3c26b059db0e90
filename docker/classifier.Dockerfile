# brainscan classifier service (internal, port 8101): TensorFlow CPU by default.
# Build from the repository root: docker build -f docker/classifier.Dockerfile -t brainscan-classifier .
# NVIDIA GPUs: --build-arg BRAINSCAN_EXTRAS=gpu,serve (run with the NVIDIA Container Toolkit).
FROM python:3.11-slim
ARG BRAINSCAN_EXTRAS=cpu,serve
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    TF_CPP_MIN_LOG_LEVEL=2 \
    BRAINSCAN_MODELS=/models
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
COPY services/classifier/ ./services/classifier/

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin brainscan
USER 10001

EXPOSE 8101
# /readyz answers 200 once at least one model is loaded (503 before: the urlopen raises)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8101/readyz', timeout=4)"]
CMD ["uvicorn", "services.classifier.app:app", "--host", "0.0.0.0", "--port", "8101", "--no-access-log", "--timeout-graceful-shutdown", "10"]
