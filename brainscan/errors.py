"""The exceptions brainscan raises for bad input, bad datasets and bad bundles.

Every error carries a machine-readable ``code`` and the HTTP status a service should answer with,
so that services map any :class:`BrainscanError` to a JSON 4xx in one place instead of
re-deciding per route. Messages say what was wrong and, where possible, what to do.

A subclass states both in its header: ``class EmptyInputError(InvalidInputError, code="empty_input",
http_status=400)``; what it leaves out it inherits.
"""

from __future__ import annotations


class BrainscanError(Exception):
    """Base class of every error brainscan raises on purpose."""

    code: str = "brainscan_error"
    http_status: int = 400

    def __init_subclass__(cls, *, code: str | None = None, http_status: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """JSON body for an API error: ``{"error": code, "detail": message}``."""
        return {"error": self.code, "detail": self.message}


class InvalidInputError(BrainscanError, ValueError, code="invalid_input", http_status=422):
    """A user-supplied file or array cannot be used (generic; prefer a subclass)."""


class EmptyInputError(InvalidInputError, code="empty_input", http_status=400):
    """A zero-byte upload or an empty array."""


class UnsupportedFormatError(InvalidInputError, code="unsupported_format", http_status=415):
    """The content is not a format we read (decided by content, never by file extension)."""


class CorruptFileError(InvalidInputError, code="corrupt_file"):
    """The format is recognised but the file is truncated or damaged."""


class InputTooLargeError(InvalidInputError, code="too_large", http_status=413):
    """Too many bytes, voxels or pixels (also: a decompression bomb)."""


class BadDimensionsError(InvalidInputError, code="bad_dimensions"):
    """Wrong number of dimensions, or absurd sizes (e.g. a 1x50000 image)."""


class VolumeMismatchError(InvalidInputError, code="volume_mismatch"):
    """The modalities of one case disagree in shape or affine."""


class NonFiniteError(InvalidInputError, code="non_finite"):
    """NaN or infinite intensities."""


class InvalidLabelsError(InvalidInputError, code="invalid_labels"):
    """A segmentation holds values outside the BraTS label set {0, 1, 2, 4}."""


class MissingModalityError(InvalidInputError, code="missing_modality"):
    """A case lacks one of t1, t1ce, t2, flair (or has one twice)."""


class DatasetLayoutError(BrainscanError, code="dataset_layout", http_status=422):
    """A dataset folder does not follow the Kaggle or BraTS layout."""


class BundleError(BrainscanError, code="bundle_invalid", http_status=503):
    """A model bundle is missing, corrupt, or does not match its manifest."""


class SeriesIdentificationError(MissingModalityError, code="series_unidentified"):
    """A DICOM study's series cannot be matched to t1, t1ce, t2 and flair without help.

    ``series`` lists what was found (UID, number, description, slice count, the modality guessed),
    so that a caller can show it and ask for an explicit ``{SeriesInstanceUID: modality}`` mapping.
    """

    def __init__(self, message: str, *, series: list[dict[str, object]] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.series = list(series or [])

    def to_dict(self) -> dict[str, object]:  # type: ignore[override]
        """``{"error", "detail", "series"}``: the series found, to build a mapping from."""
        return {**super().to_dict(), "series": self.series}


class InconsistentSeriesError(InvalidInputError, code="inconsistent_series"):
    """A DICOM series does not make one volume: missing or duplicate slices, uneven spacing, mixed
    sizes or orientations. ``code`` says which (``missing_slices``, ``duplicate_slices``,
    ``uneven_spacing``, ``misaligned_slices``, ``mixed_geometry``, ``missing_geometry``,
    ``too_few_slices``)."""


class NotMRError(InvalidInputError, code="not_mr"):
    """A DICOM image series of another modality (CT, PET...) where brain MR was expected."""


class UnsupportedTransferSyntaxError(UnsupportedFormatError, code="unsupported_transfer_syntax"):
    """DICOM pixel data compressed in a transfer syntax no installed decoder reads."""
