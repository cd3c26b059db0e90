"""The model store: versioned bundles on disk, and which version each service serves.

Layout::

    <root>/<task>/<arch>/<version>/   a bundle (manifest.json + weights.npz), see bundle.py
    <root>/<task>/<arch>/CURRENT      one line: the version that services load

``task`` is ``classification`` or ``segmentation``, ``arch`` the registered architecture name and
``version`` the manifest's version. Promotion rewrites ``CURRENT`` with a temporary file and
``os.replace``, so a reader sees the old or the new version name, never a partial one: promotion
needs no downtime (services pick the new version up when they next reload).

If ``CURRENT`` is absent, the current version is the valid bundle with the newest manifest
``created_at`` (ties broken by the larger version name); the fallback is logged. A ``CURRENT``
that names a missing or invalid bundle is an error, never silently skipped.

Listing reads manifests only and never imports TensorFlow, so TF-free services can use it.

Example:
    >>> store = ModelStore()                      # $BRAINSCAN_MODELS or <repo>/models
    >>> store.add("runs/resnet50-v3", promote=True)
    >>> bundle = load_bundle(store.current("classification", "resnet50"))
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import brainscan
from brainscan.errors import BundleError
from brainscan.models.bundle import read_spec, verify_weights
from brainscan.models.manifest import VERSION_PATTERN, Manifest
from brainscan.models.registry import TASKS

__all__ = ["CURRENT_FILE", "ENV_VAR", "ModelStore", "StoreEntry", "default_root", "format_table", "resolve_bundle"]

log = logging.getLogger(__name__)

#: name of the file, in ``<root>/<task>/<arch>/``, that holds the served version
CURRENT_FILE = "CURRENT"
#: environment variable that overrides :func:`default_root`
ENV_VAR = "BRAINSCAN_MODELS"


def default_root() -> Path:
    """``$BRAINSCAN_MODELS`` if set, else ``models/`` next to the ``brainscan`` package (the repo)."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(brainscan.__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class StoreEntry:
    """One bundle in the store, described from its manifest.

    Attributes:
        task, arch, version: its place in the store layout.
        path: the bundle directory.
        current: whether services load this version.
        demo: the manifest's ``demo`` flag (``None`` if the manifest is unreadable).
        metrics: the manifest's ``metrics``.
        created_at: the manifest's ``created_at``.
        error: why the bundle is unusable (unreadable manifest, or one that disagrees with its
            place in the store), else ``None``.
    """

    task: str
    arch: str
    version: str
    path: Path
    current: bool = False
    demo: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    error: str | None = None


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not VERSION_PATTERN.match(value):
        raise ValueError(f"{what} must match {VERSION_PATTERN.pattern}, got {value!r}")
    return value


class ModelStore:
    """Versioned bundles under ``root`` (see the module docstring for the layout).

    Args:
        root: the store folder; default :func:`default_root`. It need not exist until ``add``.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def arch_dir(self, task: str, arch: str) -> Path:
        """``<root>/<task>/<arch>``, after checking both names (no path tricks such as ``..``)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return self.root / task / _check_name(arch, "architecture name")

    def list(self, task: str | None = None, arch: str | None = None) -> list[StoreEntry]:
        """Every bundle in the store (optionally of one task / architecture), invalid ones included.

        Returns:
            entries sorted by task, architecture, then ``created_at`` and version.
        """
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        entries: list[StoreEntry] = []
        for task_name in TASKS if task is None else (task,):
            task_dir = self.root / task_name
            found = [d.name for d in _subdirs(task_dir) if VERSION_PATTERN.match(d.name)]
            arch_names = [arch] if arch is not None else found
            for arch_name in arch_names:
                scanned = self._scan(task_name, arch_name)
                try:
                    current = self._resolve_current(task_name, arch_name, scanned)
                except BundleError:
                    current = None
                entries += [replace(entry, current=entry.version == current) for entry in scanned]
        return entries

    def versions(self, task: str, arch: str) -> list[str]:
        """Names of the valid versions of ``task``/``arch``, oldest first."""
        return [entry.version for entry in self._scan(task, arch) if entry.error is None]

    def current_version(self, task: str, arch: str) -> str:
        """The version services load: ``CURRENT``, else the newest valid bundle.

        Raises:
            BundleError: no valid bundle, or ``CURRENT`` names a missing or invalid one.
        """
        return self._resolve_current(task, arch, self._scan(task, arch))

    def current(self, task: str, arch: str) -> Path:
        """Path of the current bundle of ``task``/``arch`` (see :meth:`current_version`)."""
        return self.arch_dir(task, arch) / self.current_version(task, arch)

    def promote(self, task: str, arch: str, version: str) -> Path:
        """Make ``version`` current by rewriting ``CURRENT`` atomically.

        Returns:
            the promoted bundle's path.

        Raises:
            BundleError: the version is not in the store, or its manifest or weights are invalid.
        """
        path = self.arch_dir(task, arch) / _check_name(version, "version")
        spec = read_spec(path)
        _check_place(spec, task, arch, version, path)
        verify_weights(path, spec)
        current_file = path.parent / CURRENT_FILE
        tmp = path.parent / f".{CURRENT_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with tmp.open("w", encoding="utf-8") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, current_file)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("promoted %s/%s to version %s", task, arch, version)
        return path

    def add(self, bundle_path: str | Path, *, promote: bool = False, overwrite: bool = False) -> Path:
        """Copy a bundle into ``<root>/<task>/<arch>/<version>/``, placed by its manifest.

        The bundle's manifest and weights checksum are verified first; the copy lands in a
        temporary folder and is renamed into place, so a half-copied bundle is never listed.

        Args:
            bundle_path: the bundle directory to copy (already in place: nothing is copied).
            promote: also make it the current version.
            overwrite: replace a bundle of the same task, architecture and version.

        Returns:
            the bundle's path in the store.

        Raises:
            BundleError: invalid manifest or corrupt weights.
            FileExistsError: that version is already in the store and ``overwrite`` is false.
        """
        source = Path(bundle_path)
        spec = read_spec(source)
        verify_weights(source, spec)
        task, arch, version = spec.task, spec.architecture.name, spec.version
        dest = self.arch_dir(task, arch) / _check_name(version, "version")
        if not (dest.exists() and dest.resolve() == source.resolve()):
            if dest.exists() and not overwrite:
                raise FileExistsError(
                    f"{task}/{arch}/{version} is already in the store at {dest}; "
                    "give the bundle a new version or pass overwrite=True"
                )
            _copy_into_place(source, dest)
        if promote:
            self.promote(task, arch, version)
        return dest

    def _scan(self, task: str, arch: str) -> list[StoreEntry]:
        entries = []
        for path in _subdirs(self.arch_dir(task, arch)):
            entry = StoreEntry(task=task, arch=arch, version=path.name, path=path)
            try:
                spec = read_spec(path)
                _check_place(spec, task, arch, path.name, path)
            except BundleError as exc:
                entries.append(replace(entry, error=exc.message))
                continue
            entries.append(replace(entry, demo=spec.demo, metrics=spec.metrics, created_at=spec.created_at))
        return sorted(entries, key=lambda e: (_created(e.created_at), e.version))

    def _resolve_current(self, task: str, arch: str, entries: list[StoreEntry]) -> str:
        current_file = self.arch_dir(task, arch) / CURRENT_FILE
        by_version = {entry.version: entry for entry in entries}
        if current_file.is_file():
            version = current_file.read_text(encoding="utf-8").strip()
            if version not in by_version:
                raise BundleError(f"{current_file} names version {version!r}, which is not in the store; "
                                  f"promote one of {sorted(by_version)}", code="bundle_not_found")
            if by_version[version].error:
                raise BundleError(f"current version {task}/{arch}/{version} is invalid: {by_version[version].error}")
            return version
        valid = [entry for entry in entries if entry.error is None]
        if not valid:
            raise BundleError(f"no valid {task} bundle for architecture {arch!r} in {self.root}; "
                              "add one with ModelStore.add or `brainscan models add`", code="bundle_not_found")
        # entries are sorted by (created_at, version): the last one is the newest
        newest = valid[-1]
        log.info("%s has no %s file; using the newest version %s", current_file.parent, CURRENT_FILE, newest.version)
        return newest.version


def resolve_bundle(spec: str, *, task: str | None = None, models_root: Path | None = None) -> Path:
    """The bundle folder that ``spec`` names.

    Args:
        spec: a bundle folder (or its ``manifest.json``), else ``ARCH`` or ``TASK/ARCH``: the
            current version of that architecture in the model store.
        task: the task the command needs; used to look ``ARCH`` up, and checked.
        models_root: the model store (default ``$BRAINSCAN_MODELS`` or ``./models``).

    Returns:
        the bundle folder.

    Raises:
        BundleError: no such folder nor store entry, or a bundle of the other task.
    """
    path = Path(spec)
    if not path.exists():
        store = ModelStore(models_root)
        parts = spec.strip("/").split("/")
        if len(parts) == 2 and parts[0] in TASKS:
            candidates = [tuple(parts)]
        elif len(parts) == 1 and parts[0]:
            tasks = [task] if task else [t for t in TASKS if (store.root / t / parts[0]).is_dir()]
            candidates = [(t, parts[0]) for t in tasks]
        else:
            candidates = []
        found = [(t, a) for t, a in candidates if (store.root / t / a).is_dir()]
        if not found:
            raise BundleError(
                f"{spec!r} is neither a bundle folder nor an architecture in the model store {store.root} "
                "(see `brainscan models list`, or set --models-root / $BRAINSCAN_MODELS)",
                code="bundle_not_found",
            )
        if len(found) > 1:
            raise BundleError(f"{spec!r} names bundles of several tasks; write TASK/ARCH, e.g. {found[0][0]}/{spec}")
        path = store.current(*found[0])
    spec = read_spec(path)
    if task is not None and spec.task != task:
        raise BundleError(f"bundle {spec.name} ({path}) is a {spec.task} model; this command needs "
                          f"a {task} bundle")
    return path


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders; hidden ones are copies in progress or old versions being removed."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _created(created_at: str | None) -> datetime:
    """Sort key: the parsed timestamp (naive ones taken as UTC); unreadable ones sort first."""
    try:
        moment = datetime.fromisoformat(created_at) if created_at else datetime.min
    except ValueError:
        moment = datetime.min
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _check_place(spec: Manifest, task: str, arch: str, version: str, path: Path) -> None:
    found = (spec.task, spec.architecture.name, spec.version)
    if found != (task, arch, version):
        raise BundleError(f"bundle {path} is {'/'.join(found)} by its manifest but sits at {task}/{arch}/{version}")


def _copy_into_place(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    old: Path | None = None
    try:
        shutil.copytree(source, tmp)
        verify_weights(tmp)  # the copy itself, not only the source
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old, dest)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, dict):  # one level of nesting, e.g. {"dice": {"WT": 0.9}}
            parts += [f"{key}.{k}={v:.4g}" if isinstance(v, float) else f"{key}.{k}={v}"
                      for k, v in value.items() if isinstance(v, int | float | str)]
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def format_table(entries: list[StoreEntry]) -> str:
    """A plain-text table of store entries, for ``brainscan models list``."""
    if not entries:
        return "no models found"
    header = ("TASK", "ARCH", "VERSION", "CURRENT", "DEMO", "CREATED", "METRICS")
    rows = [header]
    for e in entries:
        demo = "" if e.demo is None else ("yes" if e.demo else "no")
        detail = f"INVALID: {e.error}" if e.error else _format_metrics(e.metrics)
        rows.append((e.task, e.arch, e.version, "*" if e.current else "", demo, e.created_at or "-", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)
    return "\n".join(line.rstrip() for line in lines) + "\n"
