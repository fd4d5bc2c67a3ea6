"""A small, strict multipart/related reader (RFC 2046, RFC 2387) for STOW-RS bodies.

The whole body is already in memory and bounded by the edge's request limit; this module
bounds the number of parts and the size of each part's headers, and rejects bad framing (a
missing or wrong boundary, no closing delimiter, headers without an end) with ``BadRequest``
saying what was wrong, instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.gateway.errors import BadRequest, PayloadTooLarge

# RFC 2046 5.1.1: 1-70 characters from bchars, not ending in a space.
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_PARAM_RE = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
MAX_HEADER_BYTES = 8 * 1024


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` ->
    ``('multipart/related', {'type': 'application/dicom', 'boundary': 'x'})``."""
    media = value.split(";", 1)[0].strip().lower()
    params: dict[str, str] = {}
    for name, raw in _PARAM_RE.findall(value[len(value.split(";", 1)[0]):]):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.lower()] = raw
    return media, params


def check_boundary(boundary: str) -> str:
    if not _BOUNDARY_RE.match(boundary):
        raise BadRequest("multipart boundary must be 1-70 characters from RFC 2046's set",
                         "bad_boundary")
    return boundary


def split(body: bytes, boundary: str, max_parts: int) -> list[Part]:
    """The parts of a multipart body (preamble and epilogue ignored)."""
    dash = b"--" + check_boundary(boundary).encode("ascii")
    if body.startswith(dash):
        pos = len(dash)
    else:
        first = body.find(b"\r\n" + dash)
        if first < 0:
            raise BadRequest("multipart body does not contain its boundary", "bad_multipart")
        pos = first + 2 + len(dash)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # close delimiter
            if not parts:
                raise BadRequest("multipart body has no parts", "no_parts")
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise BadRequest("multipart body ends inside a boundary line", "bad_multipart")
        if body[pos:eol].strip(b" \t"):
            raise BadRequest("boundary line followed by other characters", "bad_multipart")
        start = eol + 2
        end = body.find(b"\r\n" + dash, start)
        if end < 0:
            raise BadRequest("multipart body has no closing boundary (truncated?)",
                             "bad_multipart")
        if len(parts) >= max_parts:
            raise PayloadTooLarge(f"more than {max_parts} parts in one request", "too_many_parts")
        parts.append(_part(body, start, end))
        pos = end + 2 + len(dash)


def _part(body: bytes, start: int, end: int) -> Part:
    if body.startswith(b"\r\n", start):  # no headers
        return Part({}, body[start + 2:end])
    sep = body.find(b"\r\n\r\n", start, min(end, start + MAX_HEADER_BYTES) + 4)
    if sep < 0:
        raise BadRequest(f"part headers missing their end or longer than {MAX_HEADER_BYTES} "
                         "bytes", "bad_multipart")
    headers: dict[str, str] = {}
    for line in body[start:sep].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise BadRequest("malformed part header line", "bad_multipart")
        headers[name.strip().lower()] = value.strip()
    return Part(headers, body[sep + 4:end])
