"""``brainscan data``: inspect dataset folders and write synthetic phantom datasets."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from brainscan.cli.arguments import command_group
from brainscan.cli.output import fmt, print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    _, commands = command_group(subparsers, "data", help="inspect datasets, write synthetic phantoms",
                                description="Inspect dataset folders and write synthetic phantom datasets.")

    inspect = commands.add_parser(
        "inspect",
        help="describe a Kaggle-layout folder, a BraTS case folder or a BraTS dataset folder",
        description=(
            "Detect the layout of PATH and describe it: image counts per split and class for the Kaggle "
            "Brain Tumor MRI layout (Training|Testing/<class>/*.jpg); modalities, shape, voxel spacing, "
            "label values and voxel counts for a BraTS case folder (or each case of a BraTS dataset "
            "folder); and every problem found. BraTS cases may follow the 2018-2021 naming "
            "(<case>_{t1,t1ce,t2,flair,seg}.nii[.gz], enhancing tumour 4) or the 2023-2024 naming "
            "(<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz, enhancing tumour 3); labels are listed as stored. "
            "Exit status 1 when problems were found, 2 when PATH is not a dataset at all."
        ),
    )
    inspect.add_argument("path", type=Path, help="dataset or case folder")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--headers-only", action="store_true",
                         help="BraTS: read NIfTI headers only (fast; no label counts, no check of voxel values)")
    inspect.set_defaults(func=run_inspect)

    phantoms = commands.add_parser(
        "phantoms",
        help="write a deterministic synthetic dataset in the Kaggle or BraTS layout",
        description=(
            "Write synthetic data ('phantoms') built on the MNI152 template, in the real dataset layouts: "
            "--layout kaggle writes Training/<class>/Tr-*.jpg slices of the four classes; --layout brats "
            "writes BraTS20_Training_NNN/ case folders with t1, t1ce, t2, flair and seg NIfTI volumes. "
            "The same --seed always gives the same files. For tests and demos only."
        ),
    )
    phantoms.add_argument("--layout", choices=("kaggle", "brats"), required=True)
    phantoms.add_argument("--out", type=Path, required=True, help="output folder (created)")
    phantoms.add_argument("--n", type=int, default=None,
                          help="number of images (kaggle, default 400) or cases (brats, default 20)")
    phantoms.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantoms.add_argument("--full-size", action="store_true",
                          help="brats only: write 240x240x155 volumes at 1 mm like real BraTS (slower, larger)")
    phantoms.set_defaults(func=run_phantoms)


def _print_kaggle(info: dict[str, Any]) -> None:
    print(f"Kaggle Brain Tumor MRI layout: {info['path']}")
    classes = info["classes"]
    rows = []
    for split, per_class in info["counts"].items():
        rows.append([split, *[per_class.get(c, 0) for c in classes], sum(per_class.values())])
    print(table(["split", *classes, "total"], rows))
    print(f"total images: {info['total']}")


def _print_case(case: dict[str, Any], indent: str = "") -> None:
    from brainscan.labels import CONVENTION_NAMES

    convention = CONVENTION_NAMES.get(case.get("label_convention") or "")
    print(f"{indent}case {case.get('case_id', '?')}{f' ({convention} naming and labels)' if convention else ''}")
    for modality, file_name in (case.get("modalities") or {}).items():
        print(f"{indent}  {modality:<6} {file_name}")
    if case.get("seg"):
        print(f"{indent}  seg    {case['seg']}")
    if case.get("shape"):
        spacing = " x ".join(fmt(float(s), 3) for s in case.get("spacing_mm") or ())
        dtypes = ", ".join(f"{k} {v}" for k, v in (case.get("dtypes") or {}).items())
        print(f"{indent}  shape {tuple(case['shape'])}, voxel spacing {spacing} mm, "
              f"orientation {case.get('orientation', '?')}")
        if dtypes:
            print(f"{indent}  dtypes: {dtypes}")
    labels = case.get("labels")
    if labels:
        rows = [[value, info["name"], info["voxels"], fmt(info["volume_ml"], 2)] for value, info in labels.items()]
        print("\n".join(indent + "  " + line for line in table(["label", "name", "voxels", "mL"], rows).splitlines()))


def _problem_text(problem: Any) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    where = Path(problem["folder"]).name if problem.get("folder") else ""
    what = problem.get("detail") or problem.get("message") or problem.get("error") or str(problem)
    code = problem.get("error") or problem.get("code")
    return f"{where + ': ' if where else ''}{what}{f' [{code}]' if code else ''}"


def run_inspect(args: argparse.Namespace) -> int:
    from brainscan.data.inspect import KAGGLE, BRATS_CASE, inspect_path

    info = inspect_path(args.path, read_data=not args.headers_only)
    # A dataset report already lists every case's problems at its top level.
    problems = [_problem_text(p) for p in info.get("problems") or []]
    if args.json:
        print_json(info)
    else:
        if info["layout"] == KAGGLE:
            _print_kaggle(info)
        elif info["layout"] == BRATS_CASE:
            print(f"BraTS case folder: {info['path']}")
            _print_case(info)
        else:
            cases = info.get("cases") or []
            print(f"BraTS dataset folder: {info['path']} ({len(cases)} cases)")
            for case in cases:
                _print_case(case, indent="  ")
        if problems:
            print(f"{len(problems)} problem(s):")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print("no problems found")
    return 1 if problems else 0


def run_phantoms(args: argparse.Namespace) -> int:
    from brainscan.data import phantoms

    if args.n is not None and args.n < 1:
        raise SystemExit(f"brainscan data phantoms: --n must be at least 1, got {args.n}")
    start = time.perf_counter()
    if args.layout == "kaggle":
        n = args.n or 400
        root = phantoms.write_kaggle_phantoms(args.out, n=n, seed=args.seed)
        what = f"{n} images in the Kaggle layout under {root}"
    else:
        n = args.n or 20
        kwargs: dict[str, Any] = {"full_size": True} if args.full_size else {}
        folders = phantoms.write_brats_phantoms(args.out, n=n, seed=args.seed, **kwargs)
        what = f"{len(folders)} BraTS-layout cases under {args.out}"
    print(f"wrote {what} in {time.perf_counter() - start:.1f} s (seed {args.seed})")
    return 0
