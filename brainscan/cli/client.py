"""``brainscan client``: classify images and segment cases through a running brainscan server."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from brainscan.cli.arguments import command_group, non_negative_float, non_negative_int, positive_float
from brainscan.cli.output import fmt, print_json, progress_bar, table
from brainscan.client import BrainscanClient, ClientError
from brainscan.errors import BrainscanError

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_AUTH = 3
EXIT_UNAVAILABLE = 4
EXIT_JOB_FAILED = 5
EXIT_TIMEOUT = 6
EXIT_PACS_STORE = 7

EXIT_CODES_HELP = """exit status:
  0  ok
  2  bad input, or the server refused the request (its message is printed)
  3  authentication failed (401/403): pass --api-key or set $BRAINSCAN_API_KEY
  4  server unavailable after retries (connection refused, 502/503/504)
  5  the segmentation job failed or was cancelled
  6  timed out waiting for the job
  7  (--pacs) the job succeeded but the PACS did not store the SEG; it is under --out"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _, commands = command_group(
        subparsers, "client", help="use a running brainscan server (brainscan up) over HTTP",
        description="Send images or BraTS cases to a brainscan server's /api/v1. Research software: NOT for "
                    "clinical use.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)

    classify = commands.add_parser(
        "classify", help="tumour class of 2D MRI slices, computed by the server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Upload each IMAGE and print its predicted class, its probability and the model version. "
                    "An image the server refuses gets a one-line error on stderr; the others are still reported."),
        epilog=f"example: brainscan client classify scan1.jpg scan2.png --json\n\n{EXIT_CODES_HELP}")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    _connection_options(classify)
    classify.add_argument("--model", default=None, help="classifier name, e.g. resnet50 (default: the server's)")
    classify.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    classify.set_defaults(func=run_classify)

    segment = commands.add_parser(
        "segment", help="tumour mask of one BraTS case or DICOM study, computed by the server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Upload the case in CASE (a folder of <case>_{t1,t1ce,t2,flair}.nii[.gz], or BraTS 2023-2024 "
                    "<case>-{t1n,t1c,t2w,t2f}.nii.gz), wait for the job while showing its progress on stderr, "
                    "write the mask (BraTS labels 0/1/2/4, or 0/1/2/3 for a 2023-2024 case, on the input grid) "
                    "to --out and print the tumour volumes in mL and the job id. CASE may also be a "
                    "skull-stripped DICOM MR study with a t1, t1ce, t2 and flair series: a folder (zipped on the "
                    "fly) or a zip, in any layout; --out is then a folder that receives seg.dcm (a DICOM SEG "
                    "referencing the t1ce series), mask.nii.gz (on the t1ce grid) and transforms.json. With --pacs "
                    "and --study instead of CASE, the server pulls the study from a PACS its operator configured "
                    "(DICOMweb), and stores the SEG back in that PACS under the same study."),
        epilog=("examples:\n  brainscan client segment BraTS2021_00006 --out pred.nii.gz\n"
                "  brainscan client segment study/ --out study_seg/\n"
                f"  brainscan client segment study.zip --out study_seg/ --series '{{\"1.2.840...\": \"t1ce\"}}'\n"
                "  brainscan client segment --pacs orthanc --study 1.2.840... --out study_seg/"
                f"\n\n{EXIT_CODES_HELP}"))
    segment.add_argument("case_dir", type=Path, metavar="CASE", nargs="?", default=None,
                         help="BraTS case folder, or DICOM study (folder or zip); not with --pacs")
    segment.add_argument("--out", type=Path, required=True, metavar="OUT",
                         help="mask file (.nii.gz) for a case folder; output folder for a DICOM study")
    segment.add_argument("--series", default=None, metavar="JSON",
                         help="DICOM only: {SeriesInstanceUID: modality} for series the headers do not make clear "
                              "(the server lists the series it found when it needs this), as JSON text or a file")
    segment.add_argument("--pacs", default=None, metavar="NAME",
                         help="pull the study from this PACS instead of uploading CASE: a DICOMweb server the "
                              "brainscan server is configured with (its name, or exactly its URL); the SEG is "
                              "stored back there")
    segment.add_argument("--study", default=None, metavar="UID", help="with --pacs: the StudyInstanceUID")
    _connection_options(segment)
    segment.add_argument("--model", default=None, help="segmentation model, e.g. unet3d (default: the server's)")
    segment.add_argument("--json", action="store_true", help="print JSON (job body and mask path); no progress")
    segment.add_argument("--timeout", type=positive_float, default=1800.0, metavar="S",
                         help="seconds to wait for the job (default 1800)")
    segment.set_defaults(func=run_segment)


def _wrap(text: str) -> str:
    # The raw formatter keeps the exit-status table aligned, so descriptions are wrapped here.
    return textwrap.fill(text, width=79)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("BRAINSCAN_URL", DEFAULT_URL),
                        help=f"server URL (default: $BRAINSCAN_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("BRAINSCAN_API_KEY"),
                        help="X-API-Key to send (default: $BRAINSCAN_API_KEY)")
    # String defaults go through ``type`` too, so a bad environment value is reported like a bad option.
    parser.add_argument("--retries", type=non_negative_int,
                        default=os.environ.get("BRAINSCAN_CLIENT_RETRIES", "4"),
                        help="retries after a connection error or 502/503/504 "
                             "(default: $BRAINSCAN_CLIENT_RETRIES or 4)")
    parser.add_argument("--backoff", type=non_negative_float,
                        default=os.environ.get("BRAINSCAN_CLIENT_BACKOFF", "0.5"),
                        help="first retry delay in seconds, doubled each retry "
                             "(default: $BRAINSCAN_CLIENT_BACKOFF or 0.5)")


def exit_code(error: ClientError) -> int:
    """The documented exit status of a failure (see ``EXIT_CODES_HELP``)."""
    if error.code == "timeout" and error.status is None:
        return EXIT_TIMEOUT
    if error.code in ("job_failed", "job_cancelled"):
        return EXIT_JOB_FAILED
    if error.status in (401, 403):
        return EXIT_AUTH
    if error.status is None or error.status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_INPUT


def _report(error: ClientError) -> int:
    suffix = f" (HTTP {error.status}, {error.code}" if error.status else f" ({error.code}"
    suffix += f", request {error.request_id})" if error.request_id else ")"
    print(f"brainscan: error: {error.detail}{suffix}", file=sys.stderr)
    return exit_code(error)


def _client(args: argparse.Namespace, timeout: float = 60) -> BrainscanClient:
    try:
        return BrainscanClient(args.url, api_key=args.api_key, timeout=timeout, retries=args.retries,
                               backoff=args.backoff)
    except ValueError as exc:  # only the URL can still be wrong here: the other options are typed
        raise BrainscanError(f"--url: {exc}") from None


def run_classify(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    status = EXIT_OK
    try:
        with _client(args) as client:
            for path in args.images:
                try:
                    body = client.classify(path, model=args.model)
                except FileNotFoundError:
                    print(f"brainscan: error: {path}: no such file", file=sys.stderr)
                    results.append({"file": str(path), "error": {"error": "not_found", "detail": "no such file"}})
                    status = EXIT_INPUT
                    continue
                except ClientError as exc:
                    if exit_code(exc) != EXIT_INPUT:
                        raise  # auth or availability: every other image would fail the same way
                    print(f"brainscan: error: {path}: {exc.detail} (HTTP {exc.status}, {exc.code})", file=sys.stderr)
                    results.append({"file": str(path), "error": {"error": exc.code, "detail": exc.detail,
                                                                 "status": exc.status, "request_id": exc.request_id}})
                    status = EXIT_INPUT
                    continue
                results.append({"file": str(path), **body})
    except ClientError as exc:
        return _report(exc)
    if args.json:
        print_json(results)
    else:
        rows = []
        for item in results:
            if "error" in item:
                continue
            model = item.get("model") or {}
            rows.append([item["file"], item["label"], fmt(float(item["probabilities"][item["label"]])),
                         model.get("name"), model.get("version")])
        if rows:
            print(table(["file", "label", "probability", "model", "version"], rows))
    return status


class _Progress:
    """Job progress on stderr: a tqdm bar (percent) whose description is the stage and its detail."""

    def __init__(self, quiet: bool) -> None:
        self.bar = progress_bar(quiet=quiet, unit="%", total=100, leave=False,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        self.stage: str | None = None

    def __call__(self, job: dict[str, Any]) -> None:
        stage = job.get("stage") or job.get("status") or ""
        detail = job.get("stage_detail")
        self.bar.set_description_str(f"{stage}: {detail}" if detail else stage, refresh=False)
        self.bar.n = int(round(100 * float(job.get("progress") or 0.0)))
        if sys.stderr.isatty() or stage != self.stage:  # a log gets a line per stage, not one per poll
            self.bar.refresh()
        self.stage = stage

    def close(self) -> None:
        self.bar.close()


def run_segment(args: argparse.Namespace) -> int:
    from brainscan.client import is_dicom_study

    problem = _source_problem(args)
    if problem:
        print(f"brainscan: error: {problem}", file=sys.stderr)
        return EXIT_INPUT
    dicom = args.pacs is not None or (args.case_dir.exists() and is_dicom_study(args.case_dir))
    if not dicom and not args.case_dir.is_dir():
        print(f"brainscan: error: {args.case_dir} is not a folder; give a BraTS case folder, or a DICOM study "
              "(folder or zip)", file=sys.stderr)
        return EXIT_INPUT
    if not dicom and args.series:
        print(f"brainscan: error: --series applies to DICOM studies only; {args.case_dir} is a NIfTI case folder",
              file=sys.stderr)
        return EXIT_INPUT
    progress = _Progress(quiet=args.json)
    job: dict[str, Any] | None = None
    try:
        series = None
        if dicom:
            from brainscan.cli.predict import series_mapping_option

            series = series_mapping_option(args.series)
        with _client(args) as client:
            if args.pacs is not None:
                job = client.submit_pacs_segmentation(args.pacs, args.study, model=args.model, series=series)
            else:
                job = client.submit_segmentation(args.case_dir, model=args.model, series=series)
            if not args.json:
                print(f"job {job['id']} queued", file=sys.stderr)
            job = client.wait(job, progress=progress, timeout=args.timeout)
            progress.close()
            if dicom:
                files = {key: client.download_result(job, f"{key}_url", args.out / name)
                         for key, name in (("mask", "mask.nii.gz"), ("seg", "seg.dcm"),
                                           ("transforms", "transforms.json"))}
                mask = files["mask"]
            else:
                mask = client.download_mask(job, args.out)
                files = {"mask": mask}
    except ClientError as exc:
        progress.close()
        if exc.job is not None:
            job = exc.job
        code = _report(exc)
        if job is not None and args.json:
            print_json({"job": job, "mask": None})
        return code
    pacs = job["result"].get("pacs")
    status = EXIT_PACS_STORE if pacs and pacs.get("status") != "stored" else EXIT_OK
    if status != EXIT_OK:
        print(f"brainscan: error: the SEG was not stored in PACS {pacs.get('server')}: {pacs.get('detail')}",
              file=sys.stderr)
    if args.json:
        print_json({"job": job, "mask": str(mask), "files": {key: str(path) for key, path in files.items()}})
        return status
    volumes = job["result"].get("volumes_ml") or {}
    print(table(["region", "volume_ml"], [[r, fmt(volumes.get(r), 2)] for r in ("WT", "TC", "ET", "NCR", "ED")]))
    model = job.get("model") or {}
    centre = job["result"].get("tumour_centre")
    if centre:  # where to look first: the tumour's centre of mass
        print("tumour centre: voxel ({}, {}, {}), ({:.1f}, {:.1f}, {:.1f}) mm".format(*centre["voxel"], *centre["mm"]))
    print(f"mask: {mask}")
    if "seg" in files:
        print(f"DICOM SEG: {files['seg']}, transforms: {files['transforms']}")
    if pacs and pacs.get("status") == "stored":
        print(f"stored in PACS {pacs['server']} under study {pacs['study_uid']} (SOPInstanceUID "
              f"{pacs['sop_instance_uid']})")
    print(f"job: {job['id']} (model {model.get('name')} version {model.get('version')})")
    return status


def _source_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with how the command names its input (CASE, or --pacs and --study), or ``None``."""
    if args.pacs is None:
        if args.study is not None:
            return "--study names a study in a PACS; give --pacs too"
        if args.case_dir is None:
            return "give CASE (a BraTS case folder or a DICOM study), or --pacs and --study"
        return None
    if args.case_dir is not None:
        return f"give either CASE ({args.case_dir}) or --pacs, not both"
    if not args.study:
        return "--pacs needs --study: the StudyInstanceUID to pull"
    return None
