"""The exceptions brainscan raises for bad input, bad datasets and bad bundles.

Every error carries a machine-readable ``code`` and the HTTP status a service should answer with,
so that services map any :class:`BrainscanError` to a JSON 4xx in one place instead of
re-deciding per route. Messages say what was wrong and, where possible, what to do.
"""

from __future__ import annotations


class BrainscanError(Exception):
    """Base class of every error brainscan raises on purpose."""

    code: str = "brainscan_error"
    http_status: int = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """JSON body for an API error: ``{"error": code, "detail": message}``."""
        return {"error": self.code, "detail": self.message}


class InvalidInputError(BrainscanError, ValueError):
    """A user-supplied file or array cannot be used (generic; prefer a subclass)."""

    code = "invalid_input"
    http_status = 422


class EmptyInputError(InvalidInputError):
    """A zero-byte upload or an empty array."""

    code = "empty_input"
    http_status = 400


class UnsupportedFormatError(InvalidInputError):
    """The content is not a format we read (decided by content, never by file extension)."""

    code = "unsupported_format"
    http_status = 415


class CorruptFileError(InvalidInputError):
    """The format is recognised but the file is truncated or damaged."""

    code = "corrupt_file"
    http_status = 422


class InputTooLargeError(InvalidInputError):
    """Too many bytes, voxels or pixels (also: a decompression bomb)."""

    code = "too_large"
    http_status = 413


class BadDimensionsError(InvalidInputError):
    """Wrong number of dimensions, or absurd sizes (e.g. a 1x50000 image)."""

    code = "bad_dimensions"
    http_status = 422


class VolumeMismatchError(InvalidInputError):
    """The modalities of one case disagree in shape or affine."""

    code = "volume_mismatch"
    http_status = 422


class NonFiniteError(InvalidInputError):
    """NaN or infinite intensities."""

    code = "non_finite"
    http_status = 422


class InvalidLabelsError(InvalidInputError):
    """A segmentation holds values outside the BraTS label set {0, 1, 2, 4}."""

    code = "invalid_labels"
    http_status = 422


class MissingModalityError(InvalidInputError):
    """A case lacks one of t1, t1ce, t2, flair (or has one twice)."""

    code = "missing_modality"
    http_status = 422


class DatasetLayoutError(BrainscanError):
    """A dataset folder does not follow the Kaggle or BraTS layout."""

    code = "dataset_layout"
    http_status = 422


class BundleError(BrainscanError):
    """A model bundle is missing, corrupt, or does not match its manifest."""

    code = "bundle_invalid"
    http_status = 503


class SeriesIdentificationError(MissingModalityError):
    """A DICOM study's series cannot be matched to t1, t1ce, t2 and flair without help.

    ``series`` lists what was found (UID, number, description, slice count, the modality guessed),
    so that a caller can show it and ask for an explicit ``{SeriesInstanceUID: modality}`` mapping.
    """

    code = "series_unidentified"
    http_status = 422

    def __init__(self, message: str, *, series: list[dict[str, object]] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.series = list(series or [])

    def to_dict(self) -> dict[str, object]:  # type: ignore[override]
        """``{"error", "detail", "series"}``: the series found, to build a mapping from."""
        return {**super().to_dict(), "series": self.series}


class InconsistentSeriesError(InvalidInputError):
    """A DICOM series does not make one volume: missing or duplicate slices, uneven spacing, mixed
    sizes or orientations. ``code`` says which (``missing_slices``, ``duplicate_slices``,
    ``uneven_spacing``, ``misaligned_slices``, ``mixed_geometry``, ``missing_geometry``,
    ``too_few_slices``)."""

    code = "inconsistent_series"
    http_status = 422


class NotMRError(InvalidInputError):
    """A DICOM image series of another modality (CT, PET...) where brain MR was expected."""

    code = "not_mr"
    http_status = 422


class UnsupportedTransferSyntaxError(UnsupportedFormatError):
    """DICOM pixel data compressed in a transfer syntax no installed decoder reads."""

    code = "unsupported_transfer_syntax"
    http_status = 415
