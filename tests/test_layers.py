"""The layer contract (docs/ARCHITECTURE.md), checked on the source so a violation fails the suite.

Layers, bottom to top:
- the core, ``brainscan`` without ``brainscan.cli``: imports no other first-party package;
- ``training``: the core only;
- ``serving`` (FastAPI plumbing and the internal trust boundary): the core only;
- ``services`` and ``gateway``: the core and ``serving`` (never ``training``, never ``brainscan.cli``),
  and never each other: the gateway reaches the services over HTTP;
- ``brainscan.cli``: the one top layer, free to import any of them.

Every import statement counts, including the ones inside functions (lazy imports are still
dependencies). The gateway's runtime lightness is checked by importing it in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("brainscan", "serving", "training", "services", "gateway")

#: layer -> first-party layers it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "serving": {"core"},
    "training": {"core"},
    "services": {"core", "serving"},
    "gateway": {"core", "serving"},
    "cli": {"core", "serving", "training", "services", "gateway"},
}

#: Entry-point shims whose one job is to call the CLI.
ENTRY_POINTS = {"brainscan/__main__.py"}


def layer_of_module(name: str) -> str | None:
    """The layer of a dotted module name, or ``None`` for third-party and standard modules."""
    top = name.split(".")[0]
    if top not in FIRST_PARTY:
        return None
    if top == "brainscan":
        return "cli" if name == "brainscan.cli" or name.startswith("brainscan.cli.") else "core"
    return top


def layer_of_file(path: Path, root: Path = ROOT) -> str:
    relative = path.relative_to(root).with_suffix("")
    return layer_of_module(".".join(relative.parts)) or "?"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in ``tree`` (``from a import b`` gives ``a.b`` too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        relative = str(path.relative_to(root))
        if relative in ENTRY_POINTS:
            continue
        source = layer_of_file(path, root)
        for line, module in imported_modules(ast.parse(path.read_text(), filename=relative)):
            target = layer_of_module(module)
            if target is None or target == source or target in ALLOWED[source]:
                continue
            problems.append(f"{relative}:{line}: the {source} layer imports {module} ({target} layer)")
    return sorted(set(problems))


def first_party_files() -> list[Path]:
    return sorted(p for package in FIRST_PARTY for p in (ROOT / package).rglob("*.py"))


def test_layer_contract_holds() -> None:
    files = first_party_files()
    assert len(files) > 50, "the source tree was not found"
    problems = violations(files)
    assert not problems, "layer contract broken (see docs/ARCHITECTURE.md):\n" + "\n".join(problems)


def test_layer_check_catches_a_violation(tmp_path: Path) -> None:
    # The checker itself must fail on the shapes of import it is meant to catch.
    tree = ast.parse("import os\nfrom training.segmenter import train\n\ndef f():\n    import gateway.app\n")
    modules = [m for _, m in imported_modules(tree)]
    assert "training.segmenter" in modules and "gateway.app" in modules
    assert layer_of_module("brainscan.cli.predict") == "cli"
    assert layer_of_module("brainscan.models.store") == "core"
    assert layer_of_module("numpy") is None
    bad = tmp_path / "brainscan" / "probe.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from brainscan.cli.predict import main\n    import services.segmenter.app\n")
    problems = violations([bad], root=tmp_path)
    assert len(problems) == 3, problems  # brainscan.cli.predict, its .main, and services.segmenter.app
    assert all("the core layer imports" in p for p in problems)
    serving = tmp_path / "serving" / "probe.py"
    serving.parent.mkdir()
    serving.write_text("import fastapi\nfrom brainscan.errors import BrainscanError\nimport gateway.app\n")
    assert violations([serving], root=tmp_path) == ["serving/probe.py:3: the serving layer imports gateway.app (gateway layer)"]
    # and the core may not import the serving layer
    assert layer_of_module("serving.web") == "serving"


def extra_closure(extra: str) -> set[str]:
    """Normalised names of the distributions that ``pip install`` of one extra of ours brings in."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        todo = list(tomllib.load(handle)["project"]["optional-dependencies"][extra])
    seen: set[str] = set()
    while todo:
        requirement = Requirement(todo.pop())
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dependency = Requirement(line)
            environments = [{"extra": e} for e in ("", *requirement.extras)]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                todo.append(line)
    return seen


#: Run in a fresh interpreter: make every module outside the allowed distributions uninstalled, then
#: import the gateway and answer a request, as its image (the `gateway` extra only) would.
GATEWAY_ONLY = """
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names) | {"brainscan", "serving", "gateway"}
class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed and not top.startswith("_"):
            raise ModuleNotFoundError(f"No module named {name!r} (not in the gateway extra)", name=name)
        return None
sys.meta_path.insert(0, Uninstalled())
from fastapi.testclient import TestClient
import gateway.app
response = TestClient(gateway.app.app).get("/api/health")
heavy = [m for m in ("tensorflow", "keras", "cv2", "scipy", "sklearn", "numpy", "nibabel", "SimpleITK", "pydicom")
         if m in sys.modules]
print(json.dumps({"status": response.status_code, "heavy": heavy}))
"""


def test_gateway_runs_with_its_extra_alone() -> None:
    # The gateway image installs only the `gateway` extra: the app must import and answer without
    # any other distribution (and so without TensorFlow, OpenCV, SciPy, NumPy or the DICOM stack).
    allowed = extra_closure("gateway")
    assert {"fastapi", "uvicorn", "httpx"} <= allowed and "numpy" not in allowed and "scipy" not in allowed
    modules = {top for top, dists in metadata.packages_distributions().items()
               if any(canonicalize_name(d) in allowed for d in dists)}
    result = subprocess.run([sys.executable, "-c", GATEWAY_ONLY, json.dumps(sorted(modules))], capture_output=True,
                            text=True, cwd=ROOT, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "BRAINSCAN_ENV": "development", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"status": 200, "heavy": []}, outcome
