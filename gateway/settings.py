"""Gateway settings, read from ``GATEWAY_*`` environment variables.

The gateway is the only public entry point: it holds the upload limit, the API keys, the CORS
allow-list and the addresses of the internal services. Secrets have no default: with no
``GATEWAY_API_KEYS`` the API is open, which is meant for a single user on ``localhost`` only. The
internal services need ``BRAINSCAN_INTERNAL_TOKEN``, which the gateway sends on every upstream call
(:class:`~serving.internal_auth.DeploymentSettings`; required outside ``BRAINSCAN_ENV=development``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from serving.internal_auth import DeploymentSettings

REPO_ROOT = Path(__file__).resolve().parents[1]

# The classifier accepts 20 MB files; the gateway limit is on the whole multipart body, so it
# leaves room for the part headers and boundaries around a file of exactly that size.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024 + 64 * 1024
# A 3D case is four NIfTI volumes (a BraTS case is ~35 MB gzipped, up to ~140 MB uncompressed);
# the segmenter's own limit (512 MiB) stays below this, so its more specific 413 is what users see.
DEFAULT_MAX_SEGMENTATION_UPLOAD_BYTES = 600 * 1024 * 1024


def _split_csv(value: object) -> object:
    """Turn ``"a, b,,c"`` into ``["a", "b", "c"]``; lists pass through (Python callers)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(DeploymentSettings):
    """Configuration of the public gateway.

    Attributes:
        classifier_url: base URL of the classifier service (``GATEWAY_CLASSIFIER_URL``).
        segmenter_url: base URL of the segmenter API; empty means "not configured": the
            segmentation routes answer 503 and ``/api/ready`` reports it as such instead of failing.
        api_keys: comma-separated keys; when non-empty every ``/api/v1/*`` request needs a
            matching ``X-API-Key`` header.
        api_key_max_failures: wrong API keys one client address may send within
            ``api_key_failure_window_s`` before its keys are answered 429 until the oldest failure
            leaves the window (``GATEWAY_API_KEY_MAX_FAILURES``; 0 turns throttling off).
        api_key_failure_window_s: length of that window in seconds
            (``GATEWAY_API_KEY_FAILURE_WINDOW_S``).
        cors_origins: comma-separated origins allowed to call the API from a browser (none by
            default: the page is served by the gateway itself, same origin).
        max_upload_bytes: largest request body accepted for a classification, enforced while
            the body streams in.
        max_segmentation_upload_bytes: largest request body accepted for a segmentation (a 3D
            case), enforced while the body streams through to the segmenter
            (``GATEWAY_MAX_SEGMENTATION_UPLOAD_BYTES``).
        timeout_s: how long to wait for an upstream answer (a classification) before a 504.
        connect_timeout_s: how long to wait for an upstream TCP connection.
        ready_timeout_s: per-service timeout of the ``/api/ready`` probes (short, so that a
            load balancer's probe never hangs).
        frontend_dir: folder of the static web page served at ``/``.
        log_level: level of the JSON logs.
        internal_token: the token the internal services require (``BRAINSCAN_INTERNAL_TOKEN``).
        environment: ``BRAINSCAN_ENV``; ``development`` lets the gateway run without the token.
    """

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", hide_input_in_errors=True)

    classifier_url: str = "http://127.0.0.1:8101"
    segmenter_url: str = "http://127.0.0.1:8102"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_max_failures: int = Field(default=10, ge=0)
    api_key_failure_window_s: float = Field(default=60.0, gt=0)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_segmentation_upload_bytes: int = DEFAULT_MAX_SEGMENTATION_UPLOAD_BYTES
    timeout_s: float = 60.0
    connect_timeout_s: float = 3.0
    ready_timeout_s: float = 2.0
    frontend_dir: Path = REPO_ROOT / "frontend"
    log_level: str = "INFO"

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _parse_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("classifier_url", "segmenter_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"service URL must start with http:// or https://, got {value!r}")
        return value

    @field_validator("classifier_url")
    @classmethod
    def _require_classifier(cls, value: str) -> str:
        if not value:
            raise ValueError("classifier_url must be set (e.g. http://127.0.0.1:8101): classification needs it")
        return value

    @field_validator("max_upload_bytes", "max_segmentation_upload_bytes")
    @classmethod
    def _check_max_upload(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("timeout_s", "connect_timeout_s", "ready_timeout_s")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"timeouts must be > 0 seconds, got {value}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return level

    @property
    def segmenter_enabled(self) -> bool:
        """Whether a segmenter URL is configured (the segmentation routes answer 503 otherwise)."""
        return bool(self.segmenter_url)

    @property
    def api_keys_enabled(self) -> bool:
        """Whether ``/api/v1/*`` requires an ``X-API-Key``."""
        return bool(self.api_keys)


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    """Settings from the environment, read once per process."""
    return GatewaySettings()
