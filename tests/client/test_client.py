"""brainscan.client and `brainscan client`: retry policy (unit) and the CLI against the real stack."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from brainscan.cli.main import main
from brainscan.client import BrainscanClient, ClientError
from brainscan.labels import KAGGLE_CLASSES

REPO = Path(__file__).resolve().parents[2]
API_KEY = "secret-key"


# -- retry policy (httpx.MockTransport stands in for the server) ----------------------------------------

def scripted(*answers: httpx.Response | Exception) -> tuple[BrainscanClient, list[httpx.Request], list[float]]:
    """A client whose server answers ``answers`` in turn; returns it, the requests seen and the sleeps."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = BrainscanClient("http://brainscan.test", api_key="k", retries=3, backoff=0.1,
                             transport=httpx.MockTransport(handler))
    sleeps: list[float] = []
    client.sleep = sleeps.append
    return client, seen, sleeps


OK = {"label": "glioma", "probabilities": {}}


@pytest.mark.parametrize("first", [
    httpx.Response(503, json={"error": "service_unavailable", "detail": "down"}),
    httpx.Response(502, json={"error": "bad_gateway", "detail": "bad"}),
    httpx.ConnectError("refused"),
])
def test_transient_failure_then_success_is_retried_with_the_same_request_id(first) -> None:
    client, seen, sleeps = scripted(first, httpx.Response(200, json=OK))
    assert client.classify(b"raw")["label"] == "glioma"
    assert len(seen) == 2
    assert seen[0].headers["x-request-id"] == seen[1].headers["x-request-id"]
    assert seen[0].headers["x-api-key"] == "k"
    assert len(sleeps) == 1 and 0.05 <= sleeps[0] <= 0.1


def test_each_logical_call_gets_a_fresh_request_id() -> None:
    client, seen, _ = scripted(httpx.Response(200, json=OK), httpx.Response(200, json=OK))
    client.classify(b"a")
    client.classify(b"b")
    assert seen[0].headers["x-request-id"] != seen[1].headers["x-request-id"]


@pytest.mark.parametrize("status,code", [(400, "empty_input"), (401, "unauthorized"), (415, "unsupported_format"),
                                         (422, "corrupt_file"), (404, "not_found")])
def test_client_errors_are_not_retried_and_carry_the_server_json(status: int, code: str) -> None:
    client, seen, sleeps = scripted(httpx.Response(status, json={"error": code, "detail": f"why {status}",
                                                                 "request_id": "rid-1"}))
    with pytest.raises(ClientError) as info:
        client.classify(b"raw")
    assert (info.value.status, info.value.code, info.value.detail, info.value.request_id) == (
        status, code, f"why {status}", "rid-1")
    assert len(seen) == 1 and sleeps == []


@pytest.mark.parametrize("header,expected", [("7", 7.0), ("0", 0.0), ("3600", 30.0)])
def test_retry_after_is_honoured_up_to_a_cap(header: str, expected: float) -> None:
    client, seen, sleeps = scripted(httpx.Response(503, headers={"Retry-After": header}, json={"detail": "busy"}),
                                    httpx.Response(200, json=OK))
    client.classify(b"raw")
    assert sleeps == [expected] and len(seen) == 2


@pytest.mark.parametrize("method,retried", [("GET", True), ("POST", False)])
def test_504_is_retried_only_for_idempotent_requests(method: str, retried: bool) -> None:
    client, seen, _ = scripted(httpx.Response(504, json={"error": "upstream_timeout", "detail": "slow"}),
                               httpx.Response(200, json={"id": "j"}))
    if retried:
        assert client.request(method, "/api/v1/segmentations/j").json() == {"id": "j"}
    else:
        with pytest.raises(ClientError) as info:
            client.request(method, "/api/v1/segmentations")
        assert info.value.status == 504
    assert len(seen) == (2 if retried else 1)


def test_backoff_grows_and_gives_up_as_unreachable_naming_the_url() -> None:
    client, seen, sleeps = scripted(*[httpx.ConnectError("refused")] * 4)
    with pytest.raises(ClientError) as info:
        client.models()
    assert info.value.status is None and info.value.code == "unreachable"
    assert "http://brainscan.test" in info.value.detail
    assert len(seen) == 4 and len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # equal jitter: within [step/2, step]
        step = 0.1 * 2 ** attempt
        assert step / 2 <= delay <= step


def test_wait_polls_with_growing_interval_until_the_job_ends() -> None:
    states = [{"id": "j", "status": "queued", "stage": "queued", "progress": 0.0}] * 4 + [
        {"id": "j", "status": "succeeded", "stage": "done", "progress": 1.0}]
    client, seen, sleeps = scripted(*[httpx.Response(200, json=s) for s in states])
    polled: list[str] = []
    job = client.wait("j", progress=lambda body: polled.append(body["status"]), timeout=60)
    assert job["status"] == "succeeded" and polled == ["queued"] * 4 + ["succeeded"]
    assert sleeps == sorted(sleeps) and sleeps[0] == 0.5 and max(sleeps) <= 3.0


@pytest.mark.parametrize("status,code", [("failed", "job_failed"), ("cancelled", "job_cancelled")])
def test_wait_raises_for_a_job_that_did_not_succeed(status: str, code: str) -> None:
    body = {"id": "j", "status": status, "error": {"error": "boom", "detail": "worker died"}}
    client, _, _ = scripted(httpx.Response(200, json=body))
    with pytest.raises(ClientError) as info:
        client.wait("j", timeout=5)
    assert info.value.code == code and info.value.job == body


@pytest.mark.parametrize("suffixes, fields", [
    (["_t1", "_t1ce", "_t2", "_flair"], ["t1", "t1ce", "t2", "flair"]),
    (["-t1n", "-t1c", "-t2w", "-t2f"], ["t1n", "t1c", "t2w", "t2f"]),
], ids=["2021 folder", "2023 folder"])
def test_a_case_folder_is_sent_under_the_names_of_its_layout(suffixes: list[str], fields: list[str],
                                                             tmp_path: Path) -> None:
    """The server answers in the labels of the field names: a BraTS 2023-2024 folder keeps its names."""
    import nibabel as nib
    import numpy as np

    case = tmp_path / "case"
    case.mkdir()
    for suffix in suffixes:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(case / f"BraTS-X-001{suffix}.nii.gz"))
    client, seen, _ = scripted(httpx.Response(202, json={"id": "j", "status": "queued"}))
    assert client.submit_segmentation(case)["id"] == "j"
    body = seen[0].content
    assert [field for field in ("t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f")
            if f'name="{field}"'.encode() in body] == fields
    for suffix in suffixes:
        assert f'filename="BraTS-X-001{suffix}.nii.gz"'.encode() in body


# -- the real stack -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from brainscan.launcher import free_port
    from tests.bundles import make_classifier_store
    from tests.servers import launch_brainscan_up, stop_launcher, wait_for_launcher

    root = make_classifier_store(tmp_path_factory.mktemp("models"), archs=("resnet50",))
    shutil.copytree(REPO / "models" / "segmentation", root / "segmentation")
    port = free_port()
    proc = launch_brainscan_up("--port", str(port), "--models", str(root), "--api-key", API_KEY,
                               "--data-dir", str(root.parent / "var"))
    try:
        wait_for_launcher(proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_launcher(proc)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainscan.data.phantoms import make_kaggle_phantom
    from brainscan.data.phantoms.kaggle import encode_jpeg

    path = tmp_path_factory.mktemp("images") / "scan.jpg"
    path.write_bytes(encode_jpeg(make_kaggle_phantom("glioma", seed=1)))
    return path


def test_classify_prints_a_table_and_json(server: str, jpeg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "classify", str(jpeg), "--url", server, "--api-key", API_KEY]) == 0
    out = capsys.readouterr().out
    header, _, row = out.strip().splitlines()
    assert header.split() == ["file", "label", "probability", "model", "version"]
    assert row.split()[0] == str(jpeg) and row.split()[1] in KAGGLE_CLASSES
    assert 0.0 <= float(row.split()[2]) <= 1.0

    assert main(["client", "classify", str(jpeg), "--url", server, "--api-key", API_KEY, "--json"]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["file"] == str(jpeg) and item["label"] in KAGGLE_CLASSES
    assert set(item["probabilities"]) == set(KAGGLE_CLASSES)
    assert item["model"]["name"] == "resnet50"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_classify_without_a_valid_key_exits_3(server: str, jpeg: Path, key: str | None,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRAINSCAN_API_KEY", raising=False)
    args = ["client", "classify", str(jpeg), "--url", server] + (["--api-key", key] if key else [])
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "key" in err.lower()


def test_unreachable_server_exits_4_quickly(jpeg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    assert main(["client", "classify", str(jpeg), "--url", url, "--retries", "2", "--backoff", "0.01"]) == 4
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert url in err and "3 attempt(s)" in err


def test_a_text_file_as_image_exits_2_with_the_server_detail(server: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 20)
    with BrainscanClient(server, api_key=API_KEY) as client, pytest.raises(ClientError) as info:
        client.classify(text)
    assert 400 <= info.value.status < 500
    assert main(["client", "classify", str(text), "--url", server, "--api-key", API_KEY]) == 2
    err = capsys.readouterr().err
    assert info.value.detail in err and str(text) in err


def test_segment_writes_the_mask_on_the_input_grid(server: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib
    import numpy as np

    from brainscan.data.phantoms import write_brats_phantoms

    case = write_brats_phantoms(tmp_path / "cases", n=1, seed=11, shape=(64, 64, 48))[0]
    out = tmp_path / "pred" / "mask.nii.gz"
    assert main(["client", "segment", str(case), "--out", str(out), "--url", server, "--api-key", API_KEY,
                 "--timeout", "300"]) == 0
    printed = capsys.readouterr()
    reference = nib.load(str(next(case.glob("*_flair.nii.gz"))))
    mask = nib.load(str(out))
    assert mask.shape == reference.shape
    assert np.allclose(mask.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 4}
    rows = {line.split()[0]: line.split()[1] for line in printed.out.splitlines()[2:7]}
    assert set(rows) == {"WT", "TC", "ET", "NCR", "ED"}
    spacing = float(np.prod(reference.header.get_zooms()[:3])) / 1000.0
    labels = np.asarray(mask.dataobj)
    assert float(rows["WT"]) == pytest.approx(np.isin(labels, (1, 2, 4)).sum() * spacing, abs=0.01)
    if labels.any():  # the tumour's centre of mass, on the mask's grid and in its world mm
        from scipy import ndimage

        centre = np.rint(ndimage.center_of_mass(labels > 0)).astype(int)
        world = nib.affines.apply_affine(mask.affine, centre)
        shown = re.search(r"tumour centre: voxel \((\d+), (\d+), (\d+)\), \(([-\d.]+), ([-\d.]+), ([-\d.]+)\) mm",
                          printed.out)
        assert shown is not None, printed.out
        assert [int(v) for v in shown.groups()[:3]] == centre.tolist()
        assert [float(v) for v in shown.groups()[3:]] == pytest.approx(world, abs=0.06)
    else:
        assert "tumour centre" not in printed.out
    job_id = printed.out.split("job: ")[1].split()[0]
    assert job_id in printed.err  # "job <id> queued" on stderr
    with BrainscanClient(server, api_key=API_KEY) as client:
        assert client.get_job(job_id)["status"] == "succeeded"
        client.delete(job_id)
        with pytest.raises(ClientError) as info:
            client.get_job(job_id)
        assert info.value.status == 404


def test_segment_of_a_folder_that_is_not_a_case_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "segment", str(tmp_path), "--out", str(tmp_path / "m.nii.gz"),
                 "--url", "http://127.0.0.1:9"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("error,expected", [
    (ClientError(400, "empty_input", "empty"), 2),
    (ClientError(415, "unsupported_format", "not an image"), 2),
    (ClientError(401, "unauthorized", "key"), 3),
    (ClientError(403, "forbidden", "key"), 3),
    (ClientError(503, "service_unavailable", "down"), 4),
    (ClientError(504, "upstream_timeout", "slow"), 4),
    (ClientError(None, "unreachable", "refused"), 4),
    (ClientError(None, "job_failed", "boom"), 5),
    (ClientError(None, "job_cancelled", "stopped"), 5),
    (ClientError(None, "timeout", "still running"), 6),
])
def test_exit_codes_follow_the_documented_table(error: ClientError, expected: int) -> None:
    from brainscan.cli.client import EXIT_CODES_HELP, exit_code

    assert exit_code(error) == expected
    assert f"  {expected}  " in EXIT_CODES_HELP


@pytest.mark.parametrize("args", [["--url", "ftp://host"], ["--retries", "-1"], ["--backoff", "x"]])
def test_bad_connection_options_exit_2(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["client", "classify", str(tmp_path / "a.jpg"), *args])
    except SystemExit as exc:  # argparse rejects typed options itself
        code = exc.code
    assert code == 2
    assert args[1] in capsys.readouterr().err
