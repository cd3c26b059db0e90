# brainscan gateway: the public API under /api, the web page at /, /metrics. No TensorFlow.
# Build from the repository root: docker build -f docker/gateway.Dockerfile -t brainscan-gateway .

# -- the web page's one third-party module (NiiVue), as scripts/vendor-frontend.sh does it -------
FROM node:20-slim AS frontend
WORKDIR /frontend
COPY frontend/package.json frontend/package-lock.json ./
# npm ci installs exactly the locked version; --ignore-scripts: nothing from the registry runs here.
RUN npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
 && mkdir -p vendor \
 && cp node_modules/@niivue/niivue/dist/index.js vendor/niivue.js \
 && test -s vendor/niivue.js

# -- the gateway ------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app
WORKDIR /app

# Dependencies first (a layer that survives code changes): only the `gateway` extra of
# pyproject.toml, not the core's dependencies (no TensorFlow, OpenCV, SciPy or DICOM libraries).
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gateway'], sep='\n')" > /tmp/gateway.txt \
 && pip install --no-cache-dir -r /tmp/gateway.txt \
 && rm /tmp/gateway.txt

# The gateway imports its own package and brainscan's light modules (version, errors, web plumbing).
COPY brainscan/ ./brainscan/
COPY serving/ ./serving/
COPY gateway/ ./gateway/
COPY frontend/ ./frontend/
COPY --from=frontend /frontend/vendor/niivue.js ./frontend/vendor/niivue.js

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin brainscan
USER 10001

EXPOSE 8000
# slim images have no curl: a urllib one-liner (exit 1 on an error status or no answer)
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4)"]
CMD ["uvicorn", "gateway.app:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--timeout-graceful-shutdown", "10"]
