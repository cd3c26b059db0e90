"""Settings of the classifier service, read from the environment (``CLASSIFIER_*``, ``BRAINSCAN_MODELS``).

======================================  =========================  ================================
environment variable                    default                    meaning
======================================  =========================  ================================
``BRAINSCAN_MODELS``                    ``<repo>/models``          model store root
``CLASSIFIER_DEFAULT_MODEL``            ``resnet50``               model when ``?model=`` is absent
``CLASSIFIER_EXPECTED_MODELS``          ``resnet50,vit_cnn``       architectures readiness reports
                                                                   as missing when absent
``CLASSIFIER_MAX_UPLOAD_BYTES``         20 MiB                     larger uploads get 413
``CLASSIFIER_MAX_PIXELS``               50 000 000                 larger images get 413
``CLASSIFIER_MAX_DECODED_BYTES``        150 000 000                images whose decoded pixels
                                                                   (size x channels x depth, from
                                                                   the header) need more get 413
``CLASSIFIER_IMAGE_WORKERS``            2                          threads that decode, preprocess
                                                                   and explain; more requests wait,
                                                                   and leave the queue unstarted
                                                                   when their caller goes away
``CLASSIFIER_BATCH_WINDOW_MS``          5                          how long a batch waits to fill
``CLASSIFIER_MAX_BATCH``                16                         largest batch per forward pass
``CLASSIFIER_WARMUP``                   true                       trace the networks at start-up
``CLASSIFIER_LOG_LEVEL``                ``INFO``                   level of the JSON request log
``BRAINSCAN_INTERNAL_TOKEN``            none (required outside     every route but the probes needs
                                        development)               it (``serving.internal_auth``)
``BRAINSCAN_ENV``                       ``production``             ``development``: may run without
                                                                   the token (authentication off)
======================================  =========================  ================================
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from serving.internal_auth import DeploymentSettings
from brainscan.preprocess.image2d import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Settings(DeploymentSettings):
    """Classifier service settings; every field can be set by keyword (tests) or environment."""

    model_config = SettingsConfigDict(env_prefix="CLASSIFIER_", populate_by_name=True, extra="ignore",
                                      hide_input_in_errors=True)

    models_root: Path | None = Field(
        default=None,
        validation_alias="BRAINSCAN_MODELS",
        description="model store root; None: brainscan.models.store.default_root()",
    )
    default_model: str = Field(default="resnet50", description="architecture served when ?model= is absent")
    expected_models: str = Field(
        default="resnet50,vit_cnn", description="comma-separated architectures readiness expects"
    )
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest accepted upload")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=256, description="largest accepted image, in pixels")
    max_decoded_bytes: int = Field(default=DEFAULT_MAX_DECODED_BYTES, ge=256,
                                   description="largest decoded image (width x height x channels x bytes per sample)")
    image_workers: int = Field(default=2, ge=1, le=64, description="threads for decoding, preprocessing and heatmaps")
    batch_window_ms: float = Field(default=5.0, ge=0.0, le=1000.0, description="batch collection window")
    max_batch: int = Field(default=16, ge=1, le=256, description="largest batch per forward pass")
    warmup: bool = Field(default=True, description="run each network once at start-up (traces it)")
    log_level: str = Field(default="INFO", description=f"one of {LOG_LEVELS}")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {value!r}")
        return value.upper()

    @field_validator("expected_models")
    @classmethod
    def _check_expected(cls, value: str) -> str:
        return ",".join(name.strip() for name in value.split(",") if name.strip())

    @property
    def expected(self) -> tuple[str, ...]:
        """The architectures readiness reports as missing when the store lacks them."""
        return tuple(name for name in self.expected_models.split(",") if name)

    def store_root(self) -> Path:
        """The model store root: ``models_root``, else the store's default."""
        from brainscan.models.store import default_root

        return self.models_root if self.models_root is not None else default_root()
