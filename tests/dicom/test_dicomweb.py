"""The DICOMweb client (brainscan.dicom.dicomweb) and `brainscan predict segment --pacs` against a REAL Orthanc.

Orthanc with its DICOMweb plugin runs on 127.0.0.1 (tests/orthanc_server.py). The study each test
pulls is tests/dicom/studies.py's phantom study (stands for a skull-stripped four-series brain MR
study: t1ce axial, t1 sagittal, t2 axial with its own field of view, flair oblique, on a coarse
grid), uploaded with Orthanc's REST ``POST /instances`` as a modality would send it. The
multipart parser and the answers no real server gives on purpose (HTML instead of JSON, a part
that is not DICOM, a refused store) are unit tests with an ``httpx.MockTransport``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from brainscan.cli.main import main
from brainscan.dicom import StudyLimits, check_study, read_study
from brainscan.dicom.dicomweb import DicomWebClient, DicomWebError, StudyNotFoundError, check_uid, store_outcome
from brainscan.dicom.multipart import MultipartError, encode_multipart, iter_multipart, multipart_boundary
from brainscan.errors import InputTooLargeError, InvalidInputError
from tests.dicom.studies import StudyFiles, phantom_source, small_protocol, write_study
from tests.evaluation import make_segmenter_bundle
from tests.orthanc_server import OrthancServer, orthanc_server
from tests.servers import free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def upload_study(server: OrthancServer, folder: Path) -> StudyFiles:
    """A fresh phantom study (its own UIDs, from the folder name) stored in ``server``."""
    study = write_study(folder, phantom_source(), small_protocol())
    server.upload(path for paths in study.files.values() for path in paths)
    return study


@pytest.fixture(scope="module")
def pacs_study(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return upload_study(orthanc, tmp_path_factory.mktemp("pacs_study"))


@pytest.fixture()
def pacs(orthanc: OrthancServer):
    with DicomWebClient(orthanc.dicomweb_url, name="orthanc", timeout=30) as client:
        yield client


# -- multipart and UIDs (pure functions) -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_multipart_round_trip_in_any_chunking(chunk: int) -> None:
    parts = [b"first", b"", b"--not-a-boundary\r\n" * 3, bytes(range(256)) * 40]
    body, content_type = encode_multipart(parts, "application/dicom")
    body = b"preamble\r\n" + body + b"epilogue"
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    got = list(iter_multipart(pieces, multipart_boundary(content_type), max_part_bytes=20_000))
    assert [content for _, content in got] == parts
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in got)


@pytest.mark.parametrize(("cut", "max_part_bytes", "error"), [
    (lambda body: body[:-60], 4000, MultipartError),      # ends inside the last part
    (lambda body: body[:-4], 4000, MultipartError),       # no closing boundary
    (lambda body: b"no boundary here", 4000, MultipartError),
    (lambda body: body, 300, InputTooLargeError),         # a part over max_part_bytes
])
def test_multipart_errors(cut, max_part_bytes: int, error) -> None:
    body, content_type = encode_multipart([b"x" * 100, b"y" * 500], "application/dicom")
    with pytest.raises(error):
        list(iter_multipart([cut(body)], multipart_boundary(content_type), max_part_bytes=max_part_bytes))


@pytest.mark.parametrize(("content_type", "boundary"), [
    ('multipart/related; type="application/dicom"; boundary=abc-1', "abc-1"),
    ('multipart/related; boundary="quoted:b"', "quoted:b"),
    ("application/json", None),
    ("multipart/related", None),
])
def test_multipart_boundary(content_type: str, boundary: str | None) -> None:
    assert multipart_boundary(content_type) == boundary


@pytest.mark.parametrize(("value", "ok"), [
    ("1.2.840.113619.2.55.3", True), (" 1.2.3 ", True), ("0.1", True),
    ("", False), ("1.02.3", False), ("1.2.", False), ("../studies", False), ("1.2/3", False),
    ("1.2.3?x=1", False), ("1." + "1" * 63, False),
])
def test_check_uid(value: str, ok: bool) -> None:
    if ok:
        assert check_uid(value) == value.strip()
    else:
        with pytest.raises(InvalidInputError) as info:
            check_uid(value)
        assert info.value.code == "invalid_uid" and info.value.http_status == 422


# -- answers a real server does not give on purpose (mock transport) ---------------------------------


def _mock_client(handler) -> DicomWebClient:
    return DicomWebClient("http://pacs.test/dicom-web", name="mock", transport=httpx.MockTransport(handler))


SERIES_JSON = [{"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS", "Value": ["MR"]},
                "00201209": {"vr": "IS", "Value": [1]}}]


@pytest.mark.parametrize(("handler", "code"), [
    (lambda r: httpx.Response(200, html="<html>login</html>"), "pacs_bad_response"),
    (lambda r: httpx.Response(401, text="who are you"), "pacs_refused"),
    (lambda r: httpx.Response(500, text="database locked"), "pacs_error"),
    (lambda r: httpx.Response(200, json=SERIES_JSON) if r.url.path.endswith("/series")
     else httpx.Response(200, json={"not": "multipart"}), "pacs_bad_response"),
    (lambda r: httpx.Response(200, json=SERIES_JSON) if r.url.path.endswith("/series")
     else httpx.Response(200, content=encode_multipart([b"not dicom"], "application/dicom")[0],
                         headers={"content-type": encode_multipart([b""], "application/dicom")[1]}),
     "pacs_bad_response"),
])
def test_non_dicomweb_answers_are_clear_errors(handler, code: str, tmp_path: Path) -> None:
    with _mock_client(handler) as client, pytest.raises(DicomWebError) as info:
        client.retrieve_study("1.2.3", tmp_path / "study.zip")
    assert info.value.code == code and info.value.http_status == 503
    assert not (tmp_path / "study.zip").exists()


def test_a_multipart_with_another_boundary_is_cut_short(tmp_path: Path) -> None:
    body, _ = encode_multipart([b"x"], "application/dicom")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/series"):
            return httpx.Response(200, json=SERIES_JSON)
        return httpx.Response(200, content=body, headers={"content-type": "multipart/related; boundary=other"})

    with _mock_client(handler) as client, pytest.raises(DicomWebError) as info:
        client.retrieve_study("1.2.3", tmp_path / "study.zip")
    assert info.value.code == "pacs_bad_response" and "broken series" in info.value.message


def test_a_store_the_server_refuses_is_pacs_store_failed(phantom_study: StudyFiles) -> None:
    failed = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},
                                                  "00081197": {"vr": "US", "Value": [49152]}}]}}
    with _mock_client(lambda r: httpx.Response(409, json=failed)) as client, pytest.raises(DicomWebError) as info:
        client.store([phantom_study.files["t1"][0]])
    assert info.value.code == "pacs_store_failed" and "49152" in info.value.message


# -- the service's allow-list ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "servers"), [
    ("", {}),
    ('{"orthanc": "http://127.0.0.1:8042/dicom-web/"}', {"orthanc": "http://127.0.0.1:8042/dicom-web"}),
    ('{"pacs": "https://user:secret@pacs.example/dicom-web"}', {"pacs": "https://user:secret@pacs.example/dicom-web"}),
    ("not json", None), ('["http://x/dicom-web"]', None), ('{"a b": "http://u:secret@x/d"}', None),
    ('{"x": "ftp://u:secret@pacs/dicom-web"}', None), ('{"x": "http:///dicom-web"}', None),
])
def test_the_dicomweb_servers_setting(value: str, servers: dict | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from services.segmenter.settings import Settings

    monkeypatch.setenv("SEGMENTER_DICOMWEB_SERVERS", value)
    if servers is None:
        with pytest.raises(ValidationError) as info:
            Settings()
        assert "secret" not in str(info.value)
    else:
        assert Settings().dicomweb_servers == servers


SERVERS = {"orthanc": "http://127.0.0.1:8042/dicom-web", "archive": "https://pacs.example/dicom-web"}


@pytest.mark.parametrize(("value", "name"), [
    ("orthanc", "orthanc"), (" archive ", "archive"), ("http://127.0.0.1:8042/dicom-web/", "orthanc"),
    ("https://pacs.example/dicom-web", "archive"), ("Orthanc", None), ("http://127.0.0.1:8042", None),
    ("http://169.254.169.254/latest", None), ("", None),
])
def test_a_request_can_only_name_a_configured_pacs(value: str, name: str | None) -> None:
    from services.segmenter.dicom_intake import UnknownPacsError, resolve_pacs

    if name is not None:
        assert resolve_pacs(value, SERVERS) == name
        return
    with pytest.raises(UnknownPacsError) as info:
        resolve_pacs(value, SERVERS)
    assert info.value.http_status == 422 and info.value.to_dict()["servers"] == ["archive", "orthanc"]
    assert not any(url in info.value.message for url in SERVERS.values())


def test_a_push_to_a_pacs_no_longer_configured_is_recorded_as_failed(phantom_study: StudyFiles) -> None:
    from services.segmenter.dicom_intake import push_seg

    outcome = push_seg({"server": "gone", "study_uid": "1.2.3"}, phantom_study.files["t1"][0], SERVERS)
    assert (outcome["status"], outcome["error"], outcome["server"]) == ("failed", "unknown_pacs", "gone")
    assert "still a file of this job" in outcome["detail"]


# -- against the real Orthanc -----------------------------------------------------------------------


def test_qido_lists_the_study_series_with_their_instance_counts(pacs, pacs_study: StudyFiles) -> None:
    found = {item["0020000E"]["Value"][0]: item for item in pacs.search_series(pacs_study.study.study_uid)}
    assert set(found) == set(pacs_study.series_uids.values())
    for modality, uid in pacs_study.series_uids.items():
        assert found[uid]["00201209"]["Value"][0] == len(pacs_study.files[modality])
        assert found[uid]["00080060"]["Value"][0] == "MR"


def test_wado_pulls_the_study_back_as_it_was_sent(pacs, pacs_study: StudyFiles, tmp_path: Path) -> None:
    pulled = pacs.retrieve_study(pacs_study.study.study_uid, tmp_path / "study.zip")
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for paths in pacs_study.files.values() for p in paths}
    assert pulled.instances == len(sent) and sorted(pulled.series) == sorted(pacs_study.series_uids.values())
    with zipfile.ZipFile(pulled.path) as archive:
        received = {pydicom.dcmread(io.BytesIO(archive.read(n))).SOPInstanceUID: archive.read(n)
                    for n in archive.namelist()}
    assert set(received) == set(sent)
    one = next(iter(sent))
    assert pydicom.dcmread(io.BytesIO(received[one])).PixelData == pydicom.dcmread(sent[one]).PixelData
    chosen = check_study(read_study(pulled.path))
    assert {m: s["series_instance_uid"] for m, s in chosen.items()} == pacs_study.series_uids


def test_an_unknown_study_is_study_not_found(pacs, tmp_path: Path) -> None:
    with pytest.raises(StudyNotFoundError) as info:
        pacs.retrieve_study("1.2.3.999", tmp_path / "study.zip")
    assert info.value.http_status == 404 and "1.2.3.999" in info.value.message
    assert not (tmp_path / "study.zip").exists()


@pytest.mark.parametrize("limits", [StudyLimits(max_files=50), StudyLimits(max_total_bytes=100_000),
                                    StudyLimits(max_file_bytes=1000)])
def test_a_study_beyond_the_limits_is_413_and_nothing_is_kept(pacs, pacs_study: StudyFiles, tmp_path: Path,
                                                              limits: StudyLimits) -> None:
    with pytest.raises(InputTooLargeError):
        pacs.retrieve_study(pacs_study.study.study_uid, tmp_path / "study.zip", limits=limits)
    assert not (tmp_path / "study.zip").exists()


def test_an_unreachable_server_is_pacs_unreachable(tmp_path: Path) -> None:
    with DicomWebClient(f"http://127.0.0.1:{free_port()}/dicom-web", name="down") as client, \
            pytest.raises(DicomWebError) as info:
        client.search_series("1.2.3")
    assert info.value.code == "pacs_unreachable" and "down" in info.value.message


def test_stow_stores_an_instance_that_qido_then_finds(pacs, orthanc, pacs_study: StudyFiles,
                                                      tmp_path: Path) -> None:
    dataset = pydicom.dcmread(pacs_study.files["t2"][0])
    dataset.StudyInstanceUID = pydicom.uid.generate_uid()  # its own study: the shared one stays as sent
    dataset.SeriesInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "copy.dcm"
    dataset.save_as(path)
    stored = pacs.store([path])
    assert stored.sop_instance_uids == stored.confirmed == [dataset.SOPInstanceUID]
    assert orthanc.series_modalities(dataset.StudyInstanceUID) == {dataset.SeriesInstanceUID: "MR"}
    with pytest.raises(InvalidInputError) as info:
        pacs.store([b"not a DICOM file" * 20])
    assert info.value.code == "not_dicom"


def test_a_pacs_that_drops_the_instance_is_caught_by_the_check(pacs_study: StudyFiles, tmp_path: Path) -> None:
    """Orthanc with a rule that refuses SEG objects answers STOW-RS with success and keeps nothing."""
    rule = tmp_path / "refuse_seg.lua"
    rule.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= 'SEG'\nend\n")
    dataset = pydicom.dcmread(pacs_study.files["t1"][0])
    dataset.Modality = "SEG"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "seg-like.dcm"
    dataset.save_as(path)
    with orthanc_server(tmp_path / "refusing", lua_scripts=[rule]) as refusing:
        outcome = store_outcome(refusing.dicomweb_url, path, name="refusing")
    assert outcome["status"] == "failed" and outcome["error"] == "pacs_store_failed", outcome
    assert "does not list" in outcome["detail"]


# -- brainscan predict segment --pacs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmenter_bundle(tmp_path_factory.mktemp("store") / "unet3d-test", regions=True)


def test_predict_segment_pulls_from_the_pacs_and_stores_the_seg_back(bundle: Path, orthanc, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    study = upload_study(orthanc, tmp_path / "study")
    uid = study.study.study_uid
    out = tmp_path / "result"
    capsys.readouterr()
    code = main(["predict", "segment", str(bundle), "--pacs", orthanc.dicomweb_url, "--study", uid,
                 "--out", str(out), "--json", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = json.loads(stdout)
    assert result["input_kind"] == "dicom" and result["pacs"]["status"] == "stored"
    assert result["pacs"]["instances"] == sum(len(p) for p in study.files.values())
    assert {m: s["series_instance_uid"] for m, s in result["series"].items()} == study.series_uids
    seg = pydicom.dcmread(out / "seg.dcm")
    assert result["pacs"]["sop_instance_uid"] == seg.SOPInstanceUID
    assert seg.StudyInstanceUID == uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uids["t1ce"]
    modalities = orthanc.series_modalities(uid)
    assert modalities == {**{s: "MR" for s in study.series_uids.values()}, seg.SeriesInstanceUID: "SEG"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--pacs", "{url}"], "--pacs URL --study UID and no CASE"),
    (["CASE", "--pacs", "{url}", "--study", "1.2.3"], "--pacs URL --study UID and no CASE"),
    (["--study", "1.2.3"], "--study and --no-push go with --pacs"),
    (["--pacs", "{url}", "--study", "1.2.3.999"], "has no study 1.2.3.999"),
    (["--pacs", "{url}", "--study", "../../tools"], "must be a DICOM UID"),
    (["--pacs", "ftp://pacs/dicom-web", "--study", "1.2.3"], "must start with http:// or https://"),
    (["--pacs", "{url}", "--study", "1.2.3", "--out-nifti"], "--out must be a folder"),
])
def test_predict_segment_pacs_errors_exit_2(argv: list[str], message: str, bundle: Path, orthanc,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("mask.nii.gz" if "--out-nifti" in argv else "out")
    argv = [a.replace("{url}", orthanc.dicomweb_url).replace("CASE", str(tmp_path)) for a in argv
            if a != "--out-nifti"]
    capsys.readouterr()
    code = main(["predict", "segment", str(bundle), *argv, "--out", str(out), "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr, stderr
