"""Fuzzing the STOW-RS multipart/related reader (services/gateway/edges/multipart.py) and the
Content-Type parameters it takes its boundary from: well-formed bodies round-trip exactly;
mutated framing, boundaries and headers end in parts or a declared error (BadRequest,
PayloadTooLarge), within the deadline and memory bound."""

from __future__ import annotations

from hypothesis import assume, event, given
from hypothesis import strategies as st

from services.gateway.edges import multipart
from services.gateway.errors import BadRequest, GatewayError, PayloadTooLarge
from tests.fuzz.targets import MAX_PARTS, stow_body

BCHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=?"
BOUNDARIES = st.text(alphabet=BCHARS, min_size=1, max_size=70)
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                        max_size=40).map(str.strip)
HEADERS = st.dictionaries(st.sampled_from(["content-type", "content-id", "content-location",
                                           "x-extra"]), HEADER_VALUES, max_size=3)
BODIES = st.one_of(st.binary(max_size=300),
                   st.lists(st.sampled_from([b"\r\n", b"--", b"-", b"\r", b"\n", b"DICM", b"x",
                                             b"\r\n\r\n", b":"]), max_size=30).map(b"".join))


def build(boundary: str, parts: list[tuple[dict[str, str], bytes]], preamble: bytes = b"",
          epilogue: bytes = b"") -> bytes:
    dash = b"--" + boundary.encode("ascii")
    out = preamble + (b"\r\n" if preamble else b"")
    for headers, body in parts:
        head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        out += dash + b"\r\n" + head + b"\r\n" + body + b"\r\n"
    return out + dash + b"--" + epilogue


def content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def _outcome(ctype: str, body: bytes) -> list[multipart.Part] | None:
    try:
        parts = stow_body(ctype, body)
    except GatewayError as exc:
        assert isinstance(exc, (BadRequest, PayloadTooLarge)), type(exc)
        assert exc.reason and str(exc)
        event(f"{type(exc).__name__}: {exc.reason}")
        return None
    assert 1 <= len(parts) <= MAX_PARTS
    event("parts")
    return parts


@given(BOUNDARIES, st.lists(st.tuples(HEADERS, BODIES), min_size=1, max_size=MAX_PARTS),
       st.binary(max_size=20), st.binary(max_size=20))
def test_well_formed_bodies_round_trip(boundary: str, parts: list[tuple[dict[str, str], bytes]],
                                       preamble: bytes, epilogue: bytes) -> None:
    assume(not boundary.endswith(" "))
    body = build(boundary, parts, preamble.replace(b"-", b"_"), epilogue)
    # a body that contains its own delimiter is not well-formed (the sender picks a boundary
    # that does not occur)
    assume(all(b"\r\n--" + boundary.encode() not in b"\r\n" + p + b"\r\n" for _, p in parts))
    got = _outcome(content_type(boundary), body)
    assert got is not None
    assert [(p.headers, p.body) for p in got] == [
        ({k.lower(): v for k, v in h.items()}, b) for h, b in parts]


@given(BOUNDARIES, st.lists(st.tuples(HEADERS, BODIES), min_size=1, max_size=MAX_PARTS + 4),
       st.data())
def test_mutated_bodies_end_in_parts_or_a_declared_error(
        boundary: str, parts: list[tuple[dict[str, str], bytes]], data: st.DataObject) -> None:
    buf = bytearray(build(boundary, parts))
    for _ in range(data.draw(st.integers(0, 6))):
        if not buf:
            break
        pos = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "crlf"]))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[pos: pos + data.draw(st.integers(1, 8))]
        elif op == "crlf":
            buf[pos:pos] = b"\r\n"
        else:
            del buf[pos:]
    _outcome(content_type(boundary), bytes(buf))


CONTENT_TYPES = st.one_of(
    st.text(max_size=120),
    st.builds("{}{}".format, st.sampled_from(["multipart/related", "Multipart/Related ",
                                              "multipart/related;"]),
              st.lists(st.sampled_from(['; boundary=b', '; boundary="b"', ';boundary=',
                                        '; boundary="', '; type="application/dicom"', ";;",
                                        '; boundary="a\\"b"', "; boundary=" + "x" * 71,
                                        "; boundary=b ", "=", '"', "; b=oundary"]),
                       max_size=4).map("".join)))


@given(CONTENT_TYPES, st.one_of(st.binary(max_size=400),
                                st.binary(max_size=200).map(lambda b: b"--b\r\n" + b)))
def test_arbitrary_content_types_and_bodies(ctype: str, body: bytes) -> None:
    _outcome(ctype, body)


@given(st.integers(MAX_PARTS + 1, 4 * MAX_PARTS))
def test_too_many_parts_is_payload_too_large(count: int) -> None:
    try:
        stow_body(content_type("b"), build("b", [({}, b"x")] * count))
    except PayloadTooLarge as exc:
        assert exc.reason == "too_many_parts"
    else:
        raise AssertionError(f"{count} parts accepted, limit {MAX_PARTS}")


@given(st.integers(multipart.MAX_HEADER_BYTES + 1, 4 * multipart.MAX_HEADER_BYTES),
       st.binary(min_size=1, max_size=8))
def test_unterminated_long_part_headers_are_refused(size: int, pattern: bytes) -> None:
    filler = (pattern.replace(b"\r", b"_").replace(b"\n", b"_") * size)[:size]
    header = b"x-long: " + filler
    body = b"--b\r\n" + header + b"\r\n--b--"
    try:
        stow_body(content_type("b"), body)
    except BadRequest as exc:
        assert exc.reason == "bad_multipart"
    else:
        raise AssertionError("part headers without an end were accepted")
