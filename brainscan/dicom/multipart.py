"""``multipart/related`` bodies, as DICOMweb sends (WADO-RS) and takes (STOW-RS) DICOM files.

:func:`iter_multipart` reads the parts of a body while it streams in, holding one part at a time
and never more than a caller's limit, so a series of a thousand slices costs one slice of memory;
:func:`encode_multipart` builds a body from whole parts (a SEG is small).

Example:
    >>> body, content_type = encode_multipart([b"one", b"two"], "application/dicom")
    >>> [content for _, content in iter_multipart([body], multipart_boundary(content_type), 1 << 20)]
    [b'one', b'two']
"""

from __future__ import annotations

import email.message
import uuid
from collections.abc import Iterable, Iterator, Sequence

from brainscan.errors import BrainscanError, InputTooLargeError

#: most bytes of a preamble, or of one part's headers
MAX_HEADER_BYTES = 16 * 1024


class MultipartError(BrainscanError):
    """A ``multipart/related`` body without a boundary, or cut short."""

    code = "bad_multipart"
    http_status = 422


def multipart_boundary(content_type: str) -> str | None:
    """The ``boundary`` parameter of a ``multipart/...`` Content-Type, or ``None``."""
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "multipart":
        return None
    boundary = message.get_param("boundary")
    return str(boundary) if boundary else None


def encode_multipart(parts: Sequence[bytes], media_type: str) -> tuple[bytes, str]:
    """A ``multipart/related`` body of ``parts``, each of ``media_type``, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode()
    body = b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="{media_type}"; boundary={boundary}'


def iter_multipart(chunks: Iterable[bytes], boundary: str,
                   max_part_bytes: int) -> Iterator[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body as it streams in: ``(headers, content)`` each.

    Header names are lower-cased. A preamble before the first boundary and an epilogue after the
    last are ignored.

    Args:
        chunks: the body, in pieces of any size.
        boundary: the Content-Type's boundary parameter.
        max_part_bytes: largest part content kept.

    Raises:
        InputTooLargeError: (413) a part larger than ``max_part_bytes``.
        MultipartError: no boundary, or a body cut short.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    closing = b"\r\n" + delimiter
    buffer = bytearray()
    source = iter(chunks)

    def more() -> bool:
        for chunk in source:
            if chunk:
                buffer.extend(chunk)
                return True
        return False

    def too_large() -> InputTooLargeError:
        return InputTooLargeError(f"a part of the multipart body is larger than the limit of {max_part_bytes} bytes")

    while (start := buffer.find(delimiter)) < 0:
        if len(buffer) > MAX_HEADER_BYTES or not more():
            raise MultipartError("the body ended before its first multipart boundary")
    del buffer[:start + len(delimiter)]
    while True:
        while len(buffer) < 2:
            if not more():
                raise MultipartError("the body ended after a boundary, without the closing one")
        if buffer[:2] == b"--":
            return
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEADER_BYTES or not more():
                raise MultipartError("the body ended inside the headers of a part")
        headers = {}
        for line in bytes(buffer[:end]).decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        del buffer[:end + 4]
        searched = 0
        while (end := buffer.find(closing, searched)) < 0:
            if len(buffer) > max_part_bytes + len(closing):
                raise too_large()
            searched = max(0, len(buffer) - len(closing) + 1)
            if not more():
                raise MultipartError("the body ended inside a part")
        if end > max_part_bytes:
            raise too_large()
        yield headers, bytes(buffer[:end])
        del buffer[:end + len(closing)]


__all__ = ["MAX_HEADER_BYTES", "MultipartError", "encode_multipart", "iter_multipart", "multipart_boundary"]
