"""Settings of the segmenter API and worker, read from the environment (``SEGMENTER_*`` and a few shared names).

The API and the Celery worker read the same :class:`Settings`, so both agree on the broker, the
job store and the limits.

======================================  =============================  =====================================
environment variable                    default                        meaning
======================================  =============================  =====================================
``BRAINSCAN_MODELS``                    ``<repo>/models``              model store root
``SEGMENTER_BROKER_URL``                ``redis://127.0.0.1:6379/0``   Celery broker (Redis)
``SEGMENTER_RESULT_BACKEND``            the broker URL                 Celery result backend (Redis)
``SEGMENTER_JOBS_DIR``                  ``<repo>/var/jobs``            job store (one folder per job)
``SEGMENTER_JOB_TTL_S``                 86400                          jobs are deleted this long after
                                                                       they were created
``SEGMENTER_EXPIRE_INTERVAL_S``         300                            how often the API sweeps expired jobs
``SEGMENTER_MAX_UPLOAD_BYTES``          512 MiB                        larger request bodies get 413
``SEGMENTER_MAX_VOXELS``                2**25 (33.5 M)                 larger volumes get 413
``SEGMENTER_MAX_DIM``                   512                            longer axes get 422
``SEGMENTER_DEFAULT_MODEL``             ``unet3d``                     architecture when ``?model=`` is absent
``SEGMENTER_TIME_LIMIT_S``              3600                           hard limit of one job (worker killed)
``SEGMENTER_SOFT_TIME_LIMIT_S``         time limit - 60                job fails cleanly with ``time_limit``
``SEGMENTER_VISIBILITY_TIMEOUT_S``      7200                           broker redelivers an unacknowledged
                                                                       job after this; must exceed the
                                                                       time limit or long jobs run twice
``SEGMENTER_UNACKED_RESTORE_INTERVAL_S`` 10                            how often the worker looks for
                                                                       abandoned jobs (kombu)
``SEGMENTER_MAX_ATTEMPTS``              3                              a job whose worker died this many
                                                                       times fails (e.g. out of memory)
``SEGMENTER_HEARTBEAT_INTERVAL_S``      5                              a running job's worker renews its
                                                                       ``heartbeat_at`` this often
``SEGMENTER_HEARTBEAT_TIMEOUT_S``       30                             a running job without a heartbeat
                                                                       this long has lost its worker
``SEGMENTER_RECONCILE_INTERVAL_S``      10                             how often the API re-queues jobs
                                                                       that lost their worker or their
                                                                       queue message (``reconcile``)
``SEGMENTER_RECONCILE_GRACE_S``         30                             a queued job's message counts as
                                                                       lost only this long after it was sent
``SEGMENTER_PROGRESS_INTERVAL_S``       0.5                            least time between progress writes
``SEGMENTER_BROKER_TIMEOUT_S``          2.0                            connect / publish timeout (API)
``SEGMENTER_WARMUP``                    true                           worker traces each network at start
``SEGMENTER_PRECISION``                 ``auto``                       arithmetic of the networks: ``float32``,
                                                                       ``bfloat16``, or ``auto`` (bfloat16 where
                                                                       the CPU has it natively; see
                                                                       :mod:`brainscan.models.precision`)
``SEGMENTER_LOG_LEVEL``                 ``INFO``                       level of the JSON logs
``SEGMENTER_DICOMWEB_SERVERS``          ``{}``                         JSON ``{name: DICOMweb URL}``: the only
                                                                       PACS the service pulls studies from
                                                                       and pushes SEGs to (requests name one)
``SEGMENTER_DICOMWEB_TIMEOUT_S``        60                             connect / read timeout of PACS calls
``WORKER_CONCURRENCY``                  1                              worker processes (each loads the
                                                                       models; one job already uses every
                                                                       core)
``BRAINSCAN_REDIS_PASSWORD``            none (required outside         Redis password, put into the broker
                                        development unless the URLs    and result backend URLs that lack one
                                        carry one)
``BRAINSCAN_INTERNAL_TOKEN``            none (API: required outside    every API route but the probes needs
                                        development)                   it (``serving.internal_auth``)
``BRAINSCAN_ENV``                       ``production``                 ``development``: may run without
                                                                       these secrets
======================================  =============================  =====================================
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from brainscan.models.precision import PRECISIONS

from serving.internal_auth import (
    REDIS_PASSWORD_VARIABLE,
    DeploymentSettings,
    redact_secrets,
    require_secret,
    url_has_password,
    with_password,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: 33.5 M voxels: a 512 x 512 x 128 series, or 3.8 BraTS cases; the sliding-window accumulator
#: of a volume this size holds 4 float32 classes per voxel (~540 MB), so the cap bounds memory.
DEFAULT_MAX_VOXELS = 2**25
#: the longest accepted axis; longer ones are not brain MRI at any clinical resolution
DEFAULT_MAX_DIM = 512
#: the queue every segmentation job goes through
QUEUE = "segmentation"
#: the Celery task name the API enqueues (by name, so the API never imports the worker's code)
TASK_NAME = "segmenter.segment"
#: how a request names a configured PACS (``SEGMENTER_DICOMWEB_SERVERS``)
_PACS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DICOMWEB_URL = re.compile(r"^https?://[^/\s?#]+(/\S*)?$")


class Settings(DeploymentSettings):
    """Segmenter settings; every field can be set by keyword (tests) or by environment variable.

    The broker URLs stay free of secrets (they are safe to log); :attr:`authenticated_broker_url`
    and :attr:`authenticated_backend_url` are what the clients connect with.
    """

    model_config = SettingsConfigDict(env_prefix="SEGMENTER_", populate_by_name=True, extra="ignore",
                                      hide_input_in_errors=True)

    models_root: Path | None = Field(
        default=None, validation_alias=AliasChoices("BRAINSCAN_MODELS", "models_root"),
        description="model store root; None: brainscan.models.store.default_root()",
    )
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker URL (Redis)")
    result_backend: str | None = Field(default=None, description="Celery result backend; None: the broker URL")
    redis_password: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices(REDIS_PASSWORD_VARIABLE, "redis_password"),
        description="Redis password, added to broker and backend URLs that carry none",
    )
    jobs_dir: Path = Field(default=REPO_ROOT / "var" / "jobs", description="job store folder")
    job_ttl_s: float = Field(default=86400.0, gt=0, description="seconds a job is kept after creation")
    expire_interval_s: float = Field(default=300.0, gt=0, description="seconds between expiry sweeps in the API")
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="largest request body")
    max_voxels: int = Field(default=DEFAULT_MAX_VOXELS, ge=1, description="largest volume, in voxels")
    max_dim: int = Field(default=DEFAULT_MAX_DIM, ge=1, description="longest accepted axis, in voxels")
    default_model: str = Field(default="unet3d", description="architecture used when ?model= is absent")
    time_limit_s: float = Field(default=3600.0, gt=0, description="hard time limit of one job")
    soft_time_limit_s: float | None = Field(default=None, gt=0, description="soft limit; None: time limit - 60 s")
    visibility_timeout_s: float = Field(default=7200.0, gt=0, description="broker redelivery timeout")
    unacked_restore_interval_s: float = Field(default=10.0, gt=0, description="abandoned-job sweep interval")
    max_attempts: int = Field(default=3, ge=1, description="worker deaths a job survives before failing")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="seconds between a running job's heartbeats")
    heartbeat_timeout_s: float = Field(default=30.0, gt=0, description="heartbeat age that means the worker is lost")
    reconcile_interval_s: float = Field(default=10.0, gt=0, description="seconds between reconciler rounds (API)")
    reconcile_grace_s: float = Field(default=30.0, ge=0, description="seconds before a queued job's message is missed")
    progress_interval_s: float = Field(default=0.5, ge=0, description="least seconds between progress writes")
    broker_timeout_s: float = Field(default=2.0, gt=0, description="broker connect / publish timeout")
    warmup: bool = Field(default=True, description="worker runs each network once at process start")
    precision: str = Field(default="auto", description=f"one of {PRECISIONS}: the networks' arithmetic")
    log_level: str = Field(default="INFO", description=f"one of {LOG_LEVELS}")
    worker_concurrency: int = Field(
        default=1, ge=1, le=64, validation_alias=AliasChoices("WORKER_CONCURRENCY", "worker_concurrency"),
        description="worker processes",
    )

    # NoDecode: the validator reads the JSON, so that an empty value (Compose's default) means none
    dicomweb_servers: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="PACS name -> DICOMweb base URL; requests may name only these (never a URL of their own)",
    )
    dicomweb_timeout_s: float = Field(default=60.0, gt=0, description="connect / read timeout of DICOMweb calls")

    @field_validator("dicomweb_servers", mode="before")
    @classmethod
    def _check_dicomweb_servers(cls, value: object) -> dict[str, str]:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError('must be JSON such as {"orthanc": "http://pacs:8042/dicom-web"}') from None
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object such as {"orthanc": "http://pacs:8042/dicom-web"}')
        for name, url in value.items():
            if not _PACS_NAME.match(name):
                raise ValueError(f"PACS names are 1-64 letters, digits and ._-, got {name[:80]!r}")
            if not isinstance(url, str) or not _DICOMWEB_URL.match(url):
                raise ValueError(f"the DICOMweb URL of PACS {name!r} must be http(s)://host[:port]/path")
        return {name: url.rstrip("/") for name, url in value.items()}

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {value!r}")
        return value.upper()

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        if value.lower() not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
        return value.lower()

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"the segmenter needs a Redis URL (redis://host:port/db), got {redact_secrets(value)!r}")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        soft = self.soft_limit_s
        if soft >= self.time_limit_s:
            raise ValueError(f"soft_time_limit_s ({soft}) must be below time_limit_s ({self.time_limit_s})")
        if self.visibility_timeout_s <= self.time_limit_s:
            # A message not acknowledged within the visibility timeout is handed to another worker:
            # a job longer than it would run twice at once.
            raise ValueError(f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                             f"time_limit_s ({self.time_limit_s}), the longest a job can run")
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            # one late heartbeat (a busy disk, a busy CPU) must not make a live worker look lost
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be at least twice "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s})")
        return self

    @property
    def soft_limit_s(self) -> float:
        """The soft time limit: the setting, else the hard limit minus a minute (at least half of it)."""
        if self.soft_time_limit_s is not None:
            return self.soft_time_limit_s
        return max(self.time_limit_s - 60.0, self.time_limit_s / 2)

    @property
    def backend_url(self) -> str:
        """The result backend URL (the broker's when unset)."""
        return self.result_backend or self.broker_url

    @property
    def authenticated_broker_url(self) -> str:
        """The broker URL with :attr:`redis_password` in it (never log it: :meth:`redact`)."""
        return with_password(self.broker_url, self._redis_password())

    @property
    def authenticated_backend_url(self) -> str:
        """The result backend URL with :attr:`redis_password` in it."""
        return with_password(self.backend_url, self._redis_password())

    def _redis_password(self) -> str | None:
        return self.redis_password.get_secret_value() if self.redis_password else None

    def require_redis_password(self, service: str) -> None:
        """Refuse to start without a Redis password outside development mode.

        Raises:
            MissingSecretError: neither ``BRAINSCAN_REDIS_PASSWORD`` nor a password in the broker URL.
        """
        password = self._redis_password()
        if not url_has_password(self.broker_url):
            require_secret(password, variable=REDIS_PASSWORD_VARIABLE, service=service, development=self.development,
                           purpose="Redis holds the job queue, and the Redis server must require the same password")

    def redact(self, text: str) -> str:
        """``text`` without secrets (URL passwords, the Redis password, the token) and with the
        store folders written ``<jobs>`` and ``<models>`` (:meth:`redact_paths`)."""
        token = self.internal_token.get_secret_value() if self.internal_token else None
        return self.redact_paths(redact_secrets(text, self._redis_password(), token))

    def store_root(self) -> Path:
        """The model store root: ``models_root``, else the store's default."""
        from brainscan.models.store import default_root

        return self.models_root if self.models_root is not None else default_root()

    def redact_paths(self, text: str) -> str:
        """``text`` with the job store and model store folders written ``<jobs>`` and ``<models>``.

        Error details reach users (job bodies, 4xx/503 JSON, the gateway's ``/api/ready``), and
        the messages of libraries and of the model store name the files they failed on.
        """
        folders = {str(form): label for folder, label in ((self.jobs_dir, "<jobs>"), (self.store_root(), "<models>"))
                   for form in (folder, folder.resolve())}
        for folder in sorted(folders, key=len, reverse=True):  # a nested folder before the one holding it
            text = text.replace(folder, folders[folder])
        return text

