"""Tell which series of a DICOM study is t1, t1ce, t2 and flair.

Scanners name series freely ("AX T1 POST GD", "t2_tirm_tra_dark-fluid", "3D MPRAGE"), so the
guess combines the words of SeriesDescription, ProtocolName and SequenceName with what the
header records about the acquisition:

- contrast agent: a non-empty ContrastBolusAgent, or words such as "post", "gd", "+c", "contrast";
  words such as "pre" or "native" say the opposite;
- FLAIR: the words "flair", "dark fluid", "tirm" or "t2f", else an inversion recovery
  (ScanningSequence ``IR`` or an InversionTime) with a long inversion time (>= 1500 ms) and long TR;
- T2: the words "t2"/"t2w" (not "t2*", "t2 star", "flair"), else long TR (>= 2000 ms) and long
  TE (>= 60 ms) without inversion;
- T1: the words "t1", "mprage", "spgr", "bravo", "tfl", else a short TR (< 1000 ms) with short TE
  (< 30 ms), or a short inversion time (< 1300 ms) with short TE (MPRAGE).

Localizers, derived images (ImageType ``DERIVED``: reformats, maps) and series of other modalities
are never guessed. An explicit ``{SeriesInstanceUID: modality}`` mapping wins over guessing; the
modalities it leaves out are guessed among the series it leaves out.

Example:
    >>> chosen = identify_series(study)                  # {"t1": DicomSeries, "t1ce": ..., ...}
    >>> chosen = identify_series(study, {"1.2.3.4": "t1ce"})
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from brainscan.dicom.reader import DicomSeries, DicomStudy
from brainscan.errors import InvalidInputError, NotMRError, SeriesIdentificationError
from brainscan.labels import MODALITIES

logger = logging.getLogger(__name__)


def _words(*alternatives: str) -> re.Pattern[str]:
    """A pattern matching any alternative as a whole word of normalised text (see :func:`_text`)."""
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(alternatives) + r")(?![a-z0-9])")


_FLAIR_WORDS = _words("flair", "dark fluid", "darkfluid", "tirm", "t2f", r"fluid attenuat\w*")
_T2_STAR_WORDS = _words(r"t2\s?\*", "t2 star", "t2star", "swi", "swan", r"hemo\w*")
_T2_WORDS = _words("t2", "t2w", "t2wi", "t2 weighted")
_T1_WORDS = _words("t1", "t1w", "t1wi", "t1c", "t1ce", "t1n", "t1 weighted", "mprage", "mp rage", "spgr", "fspgr",
                   "bravo", "tfl", "tfe", "vibe")
_CONTRAST_WORDS = re.compile(_words(r"post\w*", "gd", r"gad\w*", "contrast", "ce", "t1c", "t1ce", "pc").pattern
                             + r"|\+\s?c(?![a-z0-9])|\+\s?gd|(?<![a-z0-9])c\+")
_NO_CONTRAST_WORDS = _words("pre", "precontrast", "pre contrast", "native", "t1n", "nc", "non contrast",
                            "without contrast", "wo")
_SKIP_WORDS = _words(r"locali[sz]er", "scout", "survey", "3 ?plane", "cal", "calibration", "dwi", "diffusion", "adc",
                     "dti", "trace", "perfusion", "perf", "dsc", "dce", "swi", "mra", "tof", "asl", "mip")


def _text(series: DicomSeries) -> str:
    """SeriesDescription, ProtocolName and SequenceName in lower case, ``_ - . , ; : ( ) [ ]`` as spaces."""
    header = series.first
    words = [str(header.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName")]
    return re.sub(r"[_\-./,;:()\[\]]+", " ", " ".join(words).lower())


def _number(header: Any, keyword: str) -> float | None:
    value = header.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _skip_reason(series: DicomSeries) -> str | None:
    """Why a series is never guessed as one of the four, or ``None``."""
    header = series.first
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if series.modality != "MR":
        return f"{series.modality or 'unknown'} modality, not MR"
    if "LOCALIZER" in image_type or _SKIP_WORDS.search(_text(series)):
        return "localizer or non-structural sequence"
    if image_type and image_type[0] == "DERIVED":
        return "derived image (reformat or map)"
    return None


def has_contrast(series: DicomSeries) -> bool | None:
    """``True`` if the header says contrast was given, ``False`` if it says none, else ``None``."""
    agent = str(series.first.get("ContrastBolusAgent", "") or "").strip()
    text = _text(series)
    if agent and agent.lower() not in ("none", "no", "n/a"):
        return True
    if _NO_CONTRAST_WORDS.search(text):
        return False
    if _CONTRAST_WORDS.search(text):
        return True
    return None


def _weighting(series: DicomSeries) -> str | None:
    """``"flair"``, ``"t2"`` or ``"t1"`` from words first, then from TR/TE/TI; ``None`` if unclear."""
    text = _text(series)
    if _FLAIR_WORDS.search(text):
        return "flair"
    if _T2_STAR_WORDS.search(text):
        return None
    if _T2_WORDS.search(text):
        return "t2"
    if _T1_WORDS.search(text):
        return "t1"
    header = series.first
    tr, te, ti = (_number(header, k) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    scanning = {str(v).upper() for v in (header.get("ScanningSequence") or [])}
    inversion = ti is not None and ti > 0 or "IR" in scanning
    if inversion and ti is not None and ti >= 1500 and (tr is None or tr >= 4000):
        return "flair"
    if tr is None or te is None:
        return None
    if not inversion and tr >= 2000 and te >= 60:
        return "t2"
    if te < 30 and (tr < 1000 or (inversion and ti is not None and ti < 1300)):
        return "t1"
    return None


def guess_modality(series: DicomSeries) -> str | None:
    """The modality (one of :data:`~brainscan.labels.MODALITIES`) a series looks like, or ``None``."""
    if _skip_reason(series) is not None:
        return None
    weighting = _weighting(series)
    if weighting == "t1":
        return "t1ce" if has_contrast(series) else "t1"
    return weighting


def describe(series: DicomSeries, guess: str | None = None) -> dict[str, Any]:
    """A series' summary with the guess (and why it was set aside), for messages and the API."""
    return {**series.summary(), "guess": guess, "ignored": _skip_reason(series)}


def parse_series_mapping(text: str | None) -> dict[str, str]:
    """Parse a JSON ``{SeriesInstanceUID: modality}`` mapping (the CLI's ``--series``, an API field).

    Returns:
        The mapping (empty for ``None`` or blank text); values are checked later against the study.

    Raises:
        InvalidInputError: (code ``bad_series_mapping``) not JSON, not an object, or a value that is
            not a string.
    """
    if text is None or not text.strip():
        return {}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"the series mapping is not valid JSON ({exc.msg} at character {exc.pos}); write "
                                '{"<SeriesInstanceUID>": "t1ce", ...}', code="bad_series_mapping") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise InvalidInputError('the series mapping must be a JSON object {"<SeriesInstanceUID>": "<modality>"} with '
                                f"modalities among {list(MODALITIES)}", code="bad_series_mapping")
    return {str(uid).strip(): modality.strip().lower() for uid, modality in mapping.items()}


def _check_mapping(study: DicomStudy, mapping: Mapping[str, str]) -> dict[str, DicomSeries]:
    chosen: dict[str, DicomSeries] = {}
    for uid, modality in mapping.items():
        if modality not in MODALITIES:
            raise InvalidInputError(f"the series mapping gives {modality!r} for {uid}; modalities are "
                                    f"{list(MODALITIES)}", code="bad_series_mapping")
        if uid not in study.series:
            raise SeriesIdentificationError(
                f"the series mapping names {uid}, which is not an image series of this study; the study holds "
                f"{_listing(study)}", series=[describe(s) for s in study.series.values()], code="bad_series_mapping")
        if modality in chosen:
            raise InvalidInputError(f"the series mapping gives {modality} to two series ({chosen[modality].uid} and "
                                    f"{uid}); map one series per modality", code="bad_series_mapping")
        if study.series[uid].modality != "MR":
            raise NotMRError(f"the series mapping gives {modality} to {study.series[uid].label}, a "
                             f"{study.series[uid].modality or 'non-MR'} series; brainscan segments MR series")
        chosen[modality] = study.series[uid]
    return chosen


def _listing(study: DicomStudy, guesses: Mapping[str, str | None] | None = None) -> str:
    parts = []
    for summary in study.summary():
        series = study.series[summary["series_instance_uid"]]
        guess = (guesses or {}).get(series.uid)
        note = f" -> {guess}" if guess else (f" (ignored: {_skip_reason(series)})" if _skip_reason(series) else "")
        parts.append(f"{series.label} [{series.modality}, {len(series.instances)} images, {series.uid}]{note}")
    return "; ".join(parts)


def identify_series(study: DicomStudy, mapping: Mapping[str, str] | None = None) -> dict[str, DicomSeries]:
    """Choose the series for t1, t1ce, t2 and flair.

    Args:
        study: from :func:`~brainscan.dicom.reader.read_study`.
        mapping: optional ``{SeriesInstanceUID: modality}``; overrides guessing for the series it
            names (it may name one to four series).

    Returns:
        ``{modality: DicomSeries}`` in :data:`~brainscan.labels.MODALITIES` order.

    Raises:
        SeriesIdentificationError: a modality matches no series or several (code
            ``series_unidentified``; the message lists every series with its guess and asks for a
            mapping; ``error.series`` holds the same as data), or the mapping names an unknown
            series (code ``bad_series_mapping``).
        InvalidInputError: (code ``bad_series_mapping``) a mapping value that is not a modality,
            or one modality given to two series.
        NotMRError: the mapping chooses a series that is not MR.
    """
    chosen = _check_mapping(study, dict(mapping or {}))
    mapped = {s.uid for s in chosen.values()}
    guesses = {uid: (guess_modality(s) if uid not in mapped else None) for uid, s in study.series.items()}
    candidates: dict[str, list[DicomSeries]] = {}
    for uid, guess in guesses.items():
        if guess is not None and guess not in chosen:
            candidates.setdefault(guess, []).append(study.series[uid])
    missing = [m for m in MODALITIES if m not in chosen and not candidates.get(m)]
    ambiguous = {m: found for m, found in candidates.items() if len(found) > 1}
    if missing or ambiguous:
        problems = [f"no series looks like {', '.join(missing)}"] if missing else []
        problems += [f"{len(found)} series look like {m} ({', '.join(s.label for s in found)})"
                     for m, found in ambiguous.items()]
        shown = {**guesses, **{s.uid: m for m, s in chosen.items()}}
        raise SeriesIdentificationError(
            f"cannot tell which series is which: {'; '.join(problems)}. Series found: {_listing(study, shown)}. "
            "Send a mapping {SeriesInstanceUID: modality} for t1, t1ce, t2 and flair (e.g. --series '{\"<uid>\": "
            "\"t1ce\", ...}')",
            series=[describe(s, shown.get(s.uid)) for s in study.series.values()])
    for modality in MODALITIES:
        if modality not in chosen:
            chosen[modality] = candidates[modality][0]
    logger.info("series identified: %s", ", ".join(f"{m}=series {chosen[m].number}"
                                                  f"{' (mapped)' if chosen[m].uid in mapped else ''}"
                                                  for m in MODALITIES))
    return {m: chosen[m] for m in MODALITIES}


__all__ = ["describe", "guess_modality", "has_contrast", "identify_series", "parse_series_mapping"]
