"""``brainscan predict``: classify 2D images or segment one BraTS case with a model bundle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from brainscan.cli.arguments import command_group, overlap_fraction, positive_int
from brainscan.errors import BrainscanError
from brainscan.models.precision import PRECISIONS
from brainscan.models.store import resolve_bundle

_BUNDLE_HELP = ("model bundle folder (holding manifest.json), or ARCH / TASK/ARCH for the current "
                "version in the model store (see `brainscan models list`)")
_MASK_SUFFIXES = (".nii", ".nii.gz")
#: How DICOM series reach the t1ce grid (brainscan.dicom.registration.METHODS, not imported here:
#: the parser must not load SimpleITK).
ALIGNMENTS = ("rigid", "geometry")
#: Brain extraction for DICOM studies (brainscan.dicom.skullstrip.MODES, not imported here either).
SKULL_STRIPS = ("auto", "on", "off")


def register(subparsers: argparse._SubParsersAction) -> None:
    _, commands = command_group(
        subparsers, "predict", help="classify images or segment a BraTS case with a model bundle",
        description="Run a model bundle on your own files. Research software: NOT for clinical use.")

    classify = commands.add_parser(
        "classify", help="tumour class and probabilities of 2D MRI slices (JPEG, PNG, ...)",
        description=(
            "Print the predicted class (glioma, meningioma, notumor, pituitary) and the class probabilities "
            "of each IMAGE. Images are recognised by content and preprocessed exactly as in training. An "
            "image that cannot be read gets a one-line error on stderr; the others are still reported, "
            "and the exit status is 2."
        ),
        epilog="example: brainscan predict classify resnet50 scan1.jpg scan2.png --json",
    )
    classify.add_argument("bundle", help=_BUNDLE_HELP)
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    classify.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    classify.add_argument("--batch-size", type=positive_int, default=None,
                          help="images per network call (default: the bundle's)")
    classify.add_argument("--models-root", type=Path, default=None,
                          help="model store for ARCH / TASK/ARCH (default: $BRAINSCAN_MODELS or ./models)")
    classify.set_defaults(func=run_classify)

    segment = commands.add_parser(
        "segment", help="tumour mask of one BraTS case folder (NIfTI) or one DICOM study",
        description=(
            "Segment the case in CASE and write the mask on the grid of the input. CASE is either a BraTS case "
            "folder (files <case>_{t1,t1ce,t2,flair}.nii[.gz], or BraTS 2023-2024 <case>-{t1n,t1c,t2w,t2f}.nii.gz; "
            "a seg file is not needed), or a DICOM MR study: a folder or zip in any structure, with or without "
            "the skull, holding a t1, t1ce (post-contrast t1), t2 and flair series. For a case folder, --out is the "
            "mask file "
            "(same shape, affine and header as the input), as uint8 BraTS labels: 0 background, 1 necrotic core, "
            "2 edema, 4 enhancing tumour (3 for a case in the 2023-2024 naming, as that challenge numbers it). "
            "For a DICOM study, the series are recognised from their headers (or --series), t1, t2 and flair are "
            "registered rigidly to t1ce and resampled onto its grid, the brain is extracted when the skull is on "
            "(--skull-strip), and --out is a folder that receives seg.dcm "
            "(a DICOM Segmentation referencing the t1ce series), mask.nii.gz (on the t1ce grid) and "
            "transforms.json (every transform applied). With --pacs URL --study UID instead of CASE, the study is "
            "pulled from a DICOMweb server (QIDO-RS, WADO-RS) and the SEG is stored back in it under the same "
            "study (STOW-RS; --no-push keeps it local). Prints the tumour volumes in mL (WT whole tumour, TC "
            "tumour core, ET enhancing tumour) and the timings."
        ),
        epilog=("examples:\n"
                "  brainscan predict segment unet3d BraTS2021_00006 --out BraTS2021_00006_pred.nii.gz\n"
                "  brainscan predict segment unet3d study.zip --out study_seg/\n"
                "  brainscan predict segment unet3d study/ --out study_seg/ --series '{\"1.2.840...\": \"t1ce\"}'\n"
                "  brainscan predict segment unet3d --pacs http://127.0.0.1:8042/dicom-web --study 1.2.840... "
                "--out study_seg/"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument("bundle", help=_BUNDLE_HELP)
    segment.add_argument("case_dir", type=Path, metavar="CASE", nargs="?", default=None,
                         help="BraTS case folder, or DICOM study (folder or zip); not with --pacs")
    segment.add_argument("--out", type=Path, required=True, metavar="OUT",
                         help="mask file (.nii or .nii.gz) for a case folder; output folder for a DICOM study")
    segment.add_argument("--series", default=None, metavar="JSON",
                         help="DICOM only: {SeriesInstanceUID: modality} for series the headers do not make clear, "
                              "as JSON text or a JSON file")
    segment.add_argument("--pacs", default=None, metavar="URL",
                         help="pull the DICOM study from this DICOMweb server (e.g. http://127.0.0.1:8042/dicom-web; "
                              "user:password@ in the URL for Basic authentication) instead of reading CASE")
    segment.add_argument("--study", default=None, metavar="UID", help="with --pacs: the StudyInstanceUID to pull")
    segment.add_argument("--no-push", action="store_true",
                         help="with --pacs: do not store the SEG back in the PACS")
    segment.add_argument("--alignment", choices=ALIGNMENTS, default="rigid",
                         help="DICOM only: register t1, t2, flair rigidly to t1ce (default), or resample them by "
                              "the DICOM geometry alone")
    segment.add_argument("--skull-strip", choices=SKULL_STRIPS, default="auto",
                         help="DICOM only: extract the brain (MNI152 template brain registered to t1ce, refined by "
                              "intensity) unless the study is already skull-stripped (auto, the default), always (on), "
                              "or never (off: the study is taken as skull-stripped)")
    segment.add_argument("--save-volumes", action="store_true",
                         help="DICOM only: also write the four volumes on the t1ce grid (<modality>.nii.gz)")
    segment.add_argument("--json", action="store_true", help="print JSON instead of text")
    segment.add_argument("--overlap", type=overlap_fraction, default=None,
                         help="sliding-window overlap in [0, 1) (default: the bundle's; 0 is fastest)")
    segment.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="the network's arithmetic (default auto: bfloat16 where the CPU has it natively, "
                              "as the segmenter worker serves it)")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    segment.add_argument("--models-root", type=Path, default=None,
                         help="model store for ARCH / TASK/ARCH (default: $BRAINSCAN_MODELS or ./models)")
    segment.set_defaults(func=run_segment)


def model_info(bundle: Any) -> dict[str, Any]:
    """``{"name", "arch", "version", "demo"}`` of a loaded bundle, as the services report it."""
    return {"name": bundle.name, "arch": bundle.architecture, "version": bundle.version, "demo": bundle.demo}


def _model_line(bundle: Any) -> str:
    demo = ", DEMO model: not for real use" if bundle.demo else ""
    return f"model: {bundle.name} ({bundle.architecture}, version {bundle.version}{demo})"


def run_classify(args: argparse.Namespace) -> int:
    import numpy as np

    from brainscan.cli.output import print_json, table
    from brainscan.inference.classifier import classify_images
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(resolve_bundle(args.bundle, task="classification", models_root=args.models_root))
    classes = list(bundle.classes)
    errors: dict[int, BrainscanError] = {}
    probabilities = classify_images(bundle, args.images, batch_size=args.batch_size, errors=errors)
    results: list[dict[str, Any]] = []
    for index, (image, row) in enumerate(zip(args.images, probabilities)):
        if index in errors:
            results.append({"image": str(image), "error": errors[index].code, "detail": errors[index].message})
        else:
            results.append({"image": str(image), "label": classes[int(np.argmax(row))],
                            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}})
    failed = [r for r in results if "error" in r]
    for result in failed:
        print(f"brainscan: error: {result['detail']}", file=sys.stderr)
    if args.json:
        print_json(results)
    else:
        print(_model_line(bundle))
        rows = [[r["image"], r["label"], *[f"{r['probabilities'][c]:.4f}" for c in classes]]
                for r in results if "error" not in r]
        if rows:
            print(table(["image", "label", *classes], rows))
    return 2 if failed else 0


def _progress_bar(quiet: bool, unit: str) -> Any:
    from brainscan.cli.output import progress_bar

    return progress_bar(quiet=quiet, unit=unit, leave=False)


def series_mapping_option(text: str | None) -> dict[str, str]:
    """The `--series` option: JSON text, or a JSON file, as {SeriesInstanceUID: modality}."""
    from brainscan.dicom.sequences import parse_series_mapping

    if text is not None and not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    return parse_series_mapping(text)


def _check_segment_args(args: argparse.Namespace, dicom: bool) -> None:
    is_mask_file = args.out.name.lower().endswith(_MASK_SUFFIXES)
    if dicom and is_mask_file:
        what = args.case_dir if args.case_dir is not None else f"study {args.study}"
        raise BrainscanError(f"{what} is a DICOM study: --out must be a folder (it receives seg.dcm and "
                             f"mask.nii.gz), got {args.out}", code="bad_argument")
    if not dicom:
        if not is_mask_file:
            raise BrainscanError(f"--out must end in .nii or .nii.gz, got {args.out}", code="bad_argument")
        given = [flag for flag, value in (("--series", args.series), ("--save-volumes", args.save_volumes)) if value]
        if given:
            raise BrainscanError(f"{', '.join(given)} apply to DICOM studies only; {args.case_dir} is a NIfTI case "
                                 "folder", code="bad_argument")


def run_segment(args: argparse.Namespace) -> int:
    """Segment CASE, or with ``--pacs``/``--study`` a study pulled over DICOMweb into a temporary zip
    (kept until the SEG, which references its instances, is written) and whose SEG is stored back."""
    import tempfile

    if args.pacs is None:
        if args.study is not None or args.no_push:
            raise BrainscanError("--study and --no-push go with --pacs", code="bad_argument")
        if args.case_dir is None:
            raise BrainscanError("give CASE (a BraTS case folder or a DICOM study), or --pacs URL --study UID",
                                 code="bad_argument")
        return _segment_source(args, args.case_dir)
    if args.case_dir is not None or not args.study:
        raise BrainscanError("--pacs pulls a study instead of reading CASE: give --pacs URL --study UID and no CASE",
                             code="bad_argument")
    from brainscan.dicom.dicomweb import DicomWebClient, display_url, summary_of

    _check_segment_args(args, dicom=True)  # before anything is pulled
    with tempfile.TemporaryDirectory(prefix="brainscan-pacs-") as folder:
        try:
            client = DicomWebClient(args.pacs)
        except ValueError as exc:
            raise BrainscanError(f"--pacs: {exc}", code="bad_argument") from None
        with client:
            pulled = client.retrieve_study(args.study, Path(folder) / "study.zip")
        pacs = {"url": display_url(client.base_url), **summary_of(pulled)}
        return _segment_source(args, pulled.path, pacs=pacs)


def _segment_source(args: argparse.Namespace, source: Path, pacs: dict[str, Any] | None = None) -> int:
    """Segment ``source`` (a case folder, or a DICOM study folder or zip) as ``args`` say; with ``pacs``
    (the pull's record) the study came from ``args.pacs``, and its SEG is stored back there."""
    import numpy as np

    from brainscan.cli.output import fmt, print_json, table
    from brainscan.data.brats import find_case, load_case
    from brainscan.dicom.case import is_dicom_input
    from brainscan.inference.segmenter import inference_settings, segment_case
    from brainscan.io.nifti import save_like
    from brainscan.labels import CONVENTION_NAMES, REGION_NAMES, to_convention
    from brainscan.metrics.segmentation import volumes_ml
    from brainscan.models.bundle import load_bundle

    dicom = pacs is not None or is_dicom_input(source)
    _check_segment_args(args, dicom)
    started = time.perf_counter()
    if dicom:
        from brainscan.dicom.case import load_dicom_case, save_dicom_results
        from brainscan.dicom.seg import bundle_algorithm

        mapping = series_mapping_option(args.series)
        bundle_path = resolve_bundle(args.bundle, task="segmentation", models_root=args.models_root)
        loaded: Any = load_dicom_case(source, mapping, method=args.alignment, skull_strip=args.skull_strip)
    else:
        case = find_case(source)
        bundle_path = resolve_bundle(args.bundle, task="segmentation", models_root=args.models_root)
        loaded = load_case(case, with_seg=False)
    bundle = load_bundle(bundle_path, precision=args.precision)
    load_s = time.perf_counter() - started
    overrides = {"overlap": args.overlap}
    with _progress_bar(args.quiet, "patch") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        segment_started = time.perf_counter()
        mask = segment_case(bundle, loaded, progress=progress, inference=overrides)
        segment_s = time.perf_counter() - segment_started
    write_started = time.perf_counter()
    written = to_convention(mask, loaded.label_convention)
    if dicom:
        files = save_dicom_results(loaded, written, args.out, algorithm=bundle_algorithm(bundle, overrides),
                                   save_volumes=args.save_volumes)
        out = Path(files["mask"])
    else:
        out = save_like(written, loaded.reference, args.out)
        files = {"mask": str(out)}
    write_s = time.perf_counter() - write_started
    volumes = volumes_ml(mask, loaded.reference.spacing)
    timings = {"load_s": load_s, "segment_s": segment_s, "write_s": write_s,
               "total_s": time.perf_counter() - started}
    result = {
        "case_id": loaded.case_id, "input": str(args.case_dir) if pacs is None else f"PACS {pacs['url']}",
        "input_kind": "dicom" if dicom else "nifti",
        "mask": str(out), "files": files, "shape": list(mask.shape),
        "spacing_mm": list(loaded.reference.spacing),
        "label_convention": loaded.label_convention,
        "labels_present": [int(v) for v in np.unique(written) if v != 0],
        "volumes_ml": volumes, "model": model_info(bundle), "precision": bundle.precision,
        "inference": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in inference_settings(bundle, overrides).items()},
        "timings": timings,
    }
    if dicom:
        result["series"] = loaded.series
        result["alignment"] = {t["modality"]: t["method"] for t in loaded.transforms}
        result["skull_strip"] = loaded.skull_strip.get("decision")
    status = 0
    if pacs is not None:
        result["pacs"] = {**pacs, **_store_seg(args, Path(files["seg"]))}
        if result["pacs"]["status"] == "failed":
            print(f"brainscan: error: the SEG was not stored in the PACS: {result['pacs']['detail']}; it is in "
                  f"{files['seg']}", file=sys.stderr)
            status = 1
    if args.json:
        print_json(result)
        return status
    print(f"{_model_line(bundle)}; runs in {bundle.precision}")
    if dicom:
        print(table(["modality", "series", "description", "images", "aligned by"],
                    [[m, s["series_number"], s["description"], s["instances"], result["alignment"][m]]
                     for m, s in loaded.series.items()]))
        print(f"study {loaded.case_id}: DICOM SEG written to {files['seg']}, mask to {out} (t1ce grid "
              f"{tuple(mask.shape)}, labels {result['labels_present']}), transforms to {files['transforms']}")
        print(f"skull stripping ({args.skull_strip}): {result['skull_strip']}")
    else:
        print(f"case {loaded.case_id}: mask written to {out} (shape {tuple(mask.shape)}, labels "
              f"{result['labels_present']} in the {CONVENTION_NAMES[loaded.label_convention]} convention)")
    names = {**REGION_NAMES, "NCR": "necrotic / non-enhancing core (label 1)", "ED": "edema (label 2)"}
    print(table(["region", "volume (mL)", "meaning"], [[k, fmt(v, 2), names.get(k, "")] for k, v in volumes.items()]))
    print("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()))
    if pacs is not None and result["pacs"]["status"] == "stored":
        print(f"SEG stored in PACS {pacs['url']} under study {pacs['study_uid']} (SOPInstanceUID "
              f"{result['pacs']['sop_instance_uid']})")
    return status


def _store_seg(args: argparse.Namespace, seg: Path) -> dict[str, Any]:
    """STOW-RS of the SEG to ``--pacs`` unless ``--no-push``: ``{"status": "stored" | "failed" | "skipped", ...}``."""
    from brainscan.dicom.dicomweb import store_outcome

    if args.no_push:
        return {"status": "skipped"}
    return store_outcome(args.pacs, seg)
