"""Tests of brainscan.models.store: layout, listing, CURRENT and its fallback, promotion, add."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import brainscan.models.store as store_module
from brainscan.errors import BundleError
from brainscan.labels import KAGGLE_CLASSES
from brainscan.models.bundle import MANIFEST_FILE, WEIGHTS_FILE, load_bundle, save_bundle
from brainscan.models.registry import build_model
from brainscan.models.store import CURRENT_FILE, ENV_VAR, ModelStore, StoreEntry, default_root, format_table
from brainscan.preprocess.image2d import ImagePreprocessConfig
from tests.paths import REPO_ROOT

ARGS = {"preset": "tiny", "input_size": 32, "channels": 3, "num_classes": 4}
TASK, ARCH = "classification", "vit_cnn"


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(ARCH, ARGS)


@pytest.fixture(scope="module")
def base_bundle(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle(model, tmp_path_factory.mktemp("src") / "bundle", task=TASK, architecture=ARCH,
                       architecture_args=ARGS, preprocessing=ImagePreprocessConfig(input_size=32),
                       classes=KAGGLE_CLASSES, version="v1", demo=True,
                       metrics={"val_accuracy": 0.8125, "dice": {"WT": 0.5}})


def _variant(base: Path, folder: Path, *, version: str, created_at: str, **fields: Any) -> Path:
    """A copy of ``base`` under another version and creation time (the weights stay valid)."""
    path = Path(shutil.copytree(base, folder / version))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(version=version, created_at=created_at, **fields)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _current_file(store: ModelStore) -> Path:
    return store.root / TASK / ARCH / CURRENT_FILE


def test_add_places_the_bundle_by_its_manifest(store, base_bundle):
    path = store.add(base_bundle)
    assert path == store.root / TASK / ARCH / "v1"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in base_bundle.iterdir())
    assert not _current_file(store).exists()  # add alone never changes what is served
    [entry] = store.list()
    assert entry == StoreEntry(task=TASK, arch=ARCH, version="v1", path=path, current=True, demo=True,
                               metrics={"val_accuracy": 0.8125, "dice": {"WT": 0.5}},
                               created_at=entry.created_at, error=None)


def test_add_refuses_an_existing_version_unless_overwrite(store, base_bundle, tmp_path):
    store.add(base_bundle)
    with pytest.raises(FileExistsError, match="already in the store"):
        store.add(base_bundle)
    changed = _variant(base_bundle, tmp_path / "changed", version="v1", created_at="2030-01-01T00:00:00Z",
                       metrics={"val_accuracy": 0.9})
    store.add(changed, overwrite=True)
    [entry] = store.list()
    assert entry.metrics == {"val_accuracy": 0.9}
    assert [p.name for p in (store.root / TASK / ARCH).iterdir()] == ["v1"]  # no temp/old folders left


def test_add_refuses_a_corrupt_bundle(store, base_bundle, tmp_path):
    broken = Path(shutil.copytree(base_bundle, tmp_path / "broken"))
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        store.add(broken)
    assert store.list() == []


def test_add_with_promote_writes_current(store, base_bundle):
    store.add(base_bundle, promote=True)
    assert _current_file(store).read_text() == "v1\n"
    assert store.current(TASK, ARCH) == store.root / TASK / ARCH / "v1"


def test_without_current_the_newest_created_at_wins(store, base_bundle, tmp_path):
    # "alpha" is newest by date but not by name, so a name or folder-order pick would fail
    for version, created in [("alpha", "2024-05-01T00:00:00Z"), ("beta", "2024-03-01T00:00:00.500+00:00"),
                             ("gamma", "2024-04-01T00:00:00Z")]:
        store.add(_variant(base_bundle, tmp_path / "src", version=version, created_at=created))
    assert store.current_version(TASK, ARCH) == "alpha"
    assert store.versions(TASK, ARCH) == ["beta", "gamma", "alpha"]
    assert [e.version for e in store.list() if e.current] == ["alpha"]


def test_promote_changes_current_and_list(store, base_bundle, tmp_path):
    for version, created in [("v1", "2024-01-01T00:00:00Z"), ("v2", "2024-02-01T00:00:00Z")]:
        store.add(_variant(base_bundle, tmp_path / "src", version=version, created_at=created))
    assert store.promote(TASK, ARCH, "v1") == store.root / TASK / ARCH / "v1"
    assert store.current_version(TASK, ARCH) == "v1"
    assert [(e.version, e.current) for e in store.list()] == [("v1", True), ("v2", False)]
    store.promote(TASK, ARCH, "v2")
    assert store.current(TASK, ARCH) == store.root / TASK / ARCH / "v2"


def test_promote_replaces_current_atomically(store, base_bundle, tmp_path, monkeypatch):
    for version in ("v1", "v2"):
        store.add(_variant(base_bundle, tmp_path / "src", version=version, created_at="2024-01-01T00:00:00Z"))
    store.promote(TASK, ARCH, "v1")
    calls: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording_replace(src: Any, dst: Any) -> None:
        calls.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", recording_replace)
    store.promote(TASK, ARCH, "v2")
    [(src, dst)] = calls
    assert dst == _current_file(store) and src.parent == dst.parent  # same folder: rename is atomic
    assert _current_file(store).read_text() == "v2\n"

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.promote(TASK, ARCH, "v1")
    assert _current_file(store).read_text() == "v2\n"  # readers still see the old, whole value
    assert sorted(p.name for p in _current_file(store).parent.iterdir()) == [CURRENT_FILE, "v1", "v2"]


@pytest.mark.parametrize(
    "version, message",
    [("v9", "not a directory"), ("../v1", "version must match")],
)
def test_promote_rejects_unknown_versions(store, base_bundle, version, message):
    store.add(base_bundle, promote=True)
    with pytest.raises((BundleError, ValueError), match=message):
        store.promote(TASK, ARCH, version)
    assert _current_file(store).read_text() == "v1\n"


def test_current_naming_a_missing_version_is_an_error(store, base_bundle):
    store.add(base_bundle)
    _current_file(store).write_text("v7\n")
    with pytest.raises(BundleError, match="names version 'v7', which is not in the store") as info:
        store.current(TASK, ARCH)
    assert info.value.code == "bundle_not_found"
    assert [e.current for e in store.list()] == [False]


def test_empty_store(store):
    assert store.list() == []
    with pytest.raises(BundleError, match="no valid classification bundle") as info:
        store.current(TASK, ARCH)
    assert info.value.code == "bundle_not_found"
    assert format_table([]) == "no models found"


def test_invalid_bundles_are_listed_and_never_current(store, base_bundle, tmp_path):
    store.add(_variant(base_bundle, tmp_path / "src", version="v1", created_at="2024-01-01T00:00:00Z"))
    arch_dir = store.root / TASK / ARCH
    (arch_dir / "v2").mkdir()
    (arch_dir / "v2" / MANIFEST_FILE).write_text("{broken")
    # a bundle whose manifest says v1 copied by hand into folder v3
    shutil.copytree(arch_dir / "v1", arch_dir / "v3")
    entries = {e.version: e for e in store.list()}
    assert entries["v1"].error is None and entries["v1"].current
    assert "not valid JSON" in entries["v2"].error
    assert "sits at classification/vit_cnn/v3" in entries["v3"].error
    assert store.current_version(TASK, ARCH) == "v1"
    _current_file(store).write_text("v2\n")
    with pytest.raises(BundleError, match="current version classification/vit_cnn/v2 is invalid"):
        store.current(TASK, ARCH)


def test_format_table_shows_current_demo_metrics_and_errors(store, base_bundle, tmp_path):
    store.add(base_bundle, promote=True)
    (store.root / TASK / ARCH / "v2").mkdir()
    table = format_table(store.list())
    header, *rows = table.splitlines()
    assert header.split() == ["TASK", "ARCH", "VERSION", "CURRENT", "DEMO", "CREATED", "METRICS"]
    by_version = {row.split()[2]: row for row in rows}
    assert sorted(by_version) == ["v1", "v2"]
    assert by_version["v1"].split()[:5] == [TASK, ARCH, "v1", "*", "yes"]
    assert by_version["v1"].endswith("val_accuracy=0.8125, dice.WT=0.5")
    assert "INVALID: not a model bundle" in by_version["v2"]
    assert {by_version[v].index(f" {v} ") + 1 for v in by_version} == {header.index("VERSION")}  # aligned


def test_current_bundle_loads(store, base_bundle, model):
    store.add(base_bundle, promote=True)
    bundle = load_bundle(store.current(TASK, ARCH))
    x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(bundle.model.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("task, arch", [("detection", "resnet50"), (TASK, "../x"), (TASK, "")])
def test_arch_dir_rejects_bad_names(store, task, arch):
    with pytest.raises(ValueError, match="must"):
        store.arch_dir(task, arch)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert default_root() == tmp_path and ModelStore().root == tmp_path
    monkeypatch.delenv(ENV_VAR)
    assert default_root() == REPO_ROOT / "models"


def test_listing_does_not_import_tensorflow(store, base_bundle):
    store.add(base_bundle, promote=True)
    code = (
        "import sys\n"
        "from brainscan.models.store import ModelStore, format_table\n"
        f"store = ModelStore({str(store.root)!r})\n"
        "print(format_table(store.list()), store.current('classification', 'vit_cnn'))\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "v1" in result.stdout
