"""The multipart/related reader on well-formed and broken bodies."""

from __future__ import annotations

import pytest

from services.gateway.edges.multipart import parse_media_type, split
from services.gateway.errors import BadRequest, PayloadTooLarge


def _body(boundary: str, parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
        out += b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def test_media_type_parameters_quoted_and_not() -> None:
    media, params = parse_media_type(
        'Multipart/Related; type="application/dicom"; boundary="a;b c"')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "a;b c"}
    assert parse_media_type("multipart/related;boundary=xyz")[1] == {"boundary": "xyz"}


def test_split_keeps_binary_content_and_ignores_preamble() -> None:
    blobs = [b"\x00\r\n--notboundary\r\n\xff" * 3, b"", b"second"]
    parts = split(_body("b0und", blobs, preamble=b"ignore me\r\n"), "b0und", 10)
    assert [p.body for p in parts] == blobs
    assert all(p.media_type == "application/dicom" for p in parts)


def test_part_without_headers() -> None:
    parts = split(b"--x\r\n\r\npayload\r\n--x--", "x", 10)
    assert parts[0].headers == {} and parts[0].body == b"payload"


@pytest.mark.parametrize(
    ("body", "boundary", "message"),
    [
        (b"no boundary here at all", "abc", "does not contain its boundary"),
        (b"--abc\r\nContent-Type: application/dicom\r\n\r\ntruncated", "abc", "no closing"),
        (b"--abc--\r\n", "abc", "no parts"),
        (b"--abcdef\r\n\r\nx\r\n--abc--", "abc", "followed by other characters"),
        (b"--abc\r\nContent-Type application/dicom\r\n\r\nx\r\n--abc--", "abc", "header line"),
        (b"--abc\r\n" + b"X-Long: " + b"a" * 9000 + b"\r\n\r\nx\r\n--abc--", "abc",
         "part headers"),
        (b"--abc", "abc", "ends inside a boundary line"),
    ],
)
def test_bad_framing_is_a_clear_bad_request(body: bytes, boundary: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        split(body, boundary, 10)


@pytest.mark.parametrize("boundary", ["", "a" * 71, "ends with space ", "bad\"quote", "é"])
def test_invalid_boundaries_are_refused(boundary: str) -> None:
    with pytest.raises(BadRequest, match="boundary"):
        split(b"--x\r\n\r\nx\r\n--x--", boundary, 10)


def test_part_count_is_bounded() -> None:
    with pytest.raises(PayloadTooLarge, match="more than 2 parts"):
        split(_body("b", [b"1", b"2", b"3"]), "b", 2)
