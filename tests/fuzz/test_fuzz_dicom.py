"""Fuzzing the DICOM path (parse, header checks, decoding, preprocessing): valid instances in
every transfer syntax the gateway takes, with absurd header values, wrong VRs, bogus transfer
syntaxes, broken pixel data and encapsulated fragments, then flipped, inserted and truncated
bytes. Every input must end in a result or a GatewayError, within the deadline and memory
bound (tests/fuzz/conftest.py, tests/fuzz/targets.py); inferring uses a fake inferer."""

from __future__ import annotations

import copy
import functools
import io
import time
import zlib

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag

from services.gateway.errors import GatewayError
from services.gateway.inference.core import Result
from tests.fuzz.targets import MAX_INFLATED, dicom_pipeline
from tests.gateway.util import make_instance

SEED_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                 uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless,
                 uid.JPEG2000Lossless, uid.JPEGBaseline8Bit, "multiframe-8bit")


def _write(ds: Dataset, implicit: bool = False, syntax: str | None = None) -> bytes:
    """Part-10 bytes; ``syntax`` replaces the Transfer Syntax UID in the file meta afterwards,
    so that the data set is encoded as before and the header lies about it."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit or None)
    data = buf.getvalue()
    if syntax is None:
        return data
    end = 144 + int.from_bytes(data[140:144], "little")  # (0002,0000) group length
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = uid.UID(syntax)
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return data[:132] + fp.getvalue() + data[end:]


@functools.cache
def seed_dataset(kind: str) -> Dataset:
    ds = make_instance(3, size=32)
    if kind == "multiframe-8bit":
        frames = np.stack([ds.pixel_array >> 4] * 3).astype(np.uint8)
        sc = uid.UID("1.2.840.10008.5.1.4.1.1.7.2")  # multi-frame grayscale byte SC
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sc
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.NumberOfFrames = 3
        ds.PixelData = frames.tobytes()
    elif kind == uid.JPEGBaseline8Bit:  # Pillow encodes, pydicom only encapsulates
        buf = io.BytesIO()
        Image.fromarray((ds.pixel_array >> 4).astype(np.uint8)).save(buf, "JPEG", quality=90)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid.UID(kind)
    elif kind == uid.ImplicitVRLittleEndian or kind == uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = uid.UID(kind)
    elif kind != uid.ExplicitVRLittleEndian:
        ds.compress(kind)
    return ds


@functools.cache
def seed_bytes(kind: str) -> bytes:
    ds = seed_dataset(kind)
    return _write(ds, implicit=kind == uid.ImplicitVRLittleEndian)


def test_every_seed_gives_a_result() -> None:
    """The seeds are valid: the fuzzers start from instances that reach the model."""
    for kind in SEED_SYNTAXES:
        assert isinstance(dicom_pipeline(seed_bytes(kind)), Result), kind


US = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 64, 255, 1024, 65535]),
               st.integers(0, 65535))
TEXT = st.one_of(st.sampled_from(["", "0", "-1", "1", "2", "3", "1e9", "abc", "nan", "inf",
                                  "-inf", "1\\2", "99999999999999999999", " 4 ", "0.5"]),
                 st.text(max_size=20))
UIDS = st.one_of(
    st.sampled_from([uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                     uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian,
                     uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
                     uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
                     uid.JPEG2000, uid.HTJ2K, "1.2.3.4", "", "not a uid",
                     "1.2.840.10008.5.1.4.1.1.88.11"]),
    st.text(alphabet="0123456789.", max_size=64))
US_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "SamplesPerPixel", "PlanarConfiguration")
STRING_KEYWORDS = {"NumberOfFrames": "IS", "WindowCenter": "DS", "WindowWidth": "DS",
                   "RescaleSlope": "DS", "RescaleIntercept": "DS",
                   "PhotometricInterpretation": "CS", "Modality": "CS", "VOILUTFunction": "CS"}
WRONG_VRS = ("SQ", "OB", "LO", "US", "FD", "UN", "AT", "SS", "UL")


def _raw(keyword: str, vr: str, value: bytes) -> RawDataElement:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _encapsulated(bot: bytes, fragments: list[bytes], delimited: bool) -> bytes:
    """Basic Offset Table item, fragment items, sequence delimiter; lengths as given (odd
    lengths and a missing delimiter included, as a broken encoder writes them)."""
    item = b"\xfe\xff\x00\xe0"
    out = item + len(bot).to_bytes(4, "little") + bot
    for fragment in fragments:
        out += item + len(fragment).to_bytes(4, "little") + fragment
    return out + (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" if delimited else b"")


@st.composite
def header_mutations(draw: st.DrawFn, ds: Dataset) -> tuple[Dataset, str | None]:
    """A mutated copy of ``ds`` and the transfer syntax its file meta should claim."""
    ds = copy.deepcopy(ds)  # the seed is cached and shared
    for keyword in draw(st.lists(st.sampled_from(US_KEYWORDS), max_size=3, unique=True)):
        setattr(ds, keyword, draw(US))
    for keyword in draw(st.lists(st.sampled_from(sorted(STRING_KEYWORDS)), max_size=3,
                                 unique=True)):
        text = draw(TEXT).encode("utf-8", "replace")
        ds[keyword] = _raw(keyword, STRING_KEYWORDS[keyword], text)
    if draw(st.booleans()):
        keyword = draw(st.sampled_from(US_KEYWORDS + tuple(STRING_KEYWORDS)))
        vr = draw(st.sampled_from(WRONG_VRS))
        value = draw(st.binary(max_size=16))
        if vr in ("US", "FD", "AT", "SS", "UL"):  # pydicom writes these whole values only
            value = value[: len(value) // 8 * 8]
        ds[keyword] = _raw(keyword, vr, value)
    # a bogus or wrong transfer syntax in the file meta
    syntax = draw(UIDS) if draw(st.integers(0, 4)) == 0 else None
    if draw(st.integers(0, 6)) == 0:
        ds.SOPClassUID = draw(UIDS)
    pixels = draw(st.integers(0, 5))
    if pixels == 1:
        del ds.PixelData
    elif pixels == 2:
        data = bytes(ds.PixelData)
        ds.PixelData = data[: draw(st.integers(0, len(data)))]
    elif pixels == 3:
        ds.PixelData = draw(st.binary(max_size=4096))
    elif pixels == 4:  # encapsulated fragments (valid or not for the declared syntax)
        bot = draw(st.binary(max_size=12))
        fragments = draw(st.lists(st.binary(max_size=512), min_size=0, max_size=4))
        ds.PixelData = _encapsulated(bot, fragments, draw(st.booleans()))
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds, syntax


def _serialise(mutated: tuple[Dataset, str | None], implicit: bool) -> bytes | None:
    ds, syntax = mutated
    try:
        return _write(ds, implicit, syntax)
    except Exception as exc:  # a mutation pydicom refuses to write is not an input we can send
        event(f"unwritable: {type(exc).__name__}: {str(exc)[:60]}")
        return None


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 8))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        # where: the file meta, the data set header, or anywhere (mostly pixel data)
        start, end = draw(st.sampled_from([(128, 300), (300, 1100), (0, len(buf))]))
        pos = draw(st.integers(min(start, len(buf) - 1), min(end, len(buf)) - 1))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x20]))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos: pos + draw(st.integers(1, 16))]
        else:
            del buf[pos:]
    return bytes(buf)


def _outcome(data: bytes) -> str:
    """'ok' or the GatewayError's reason; any other exception propagates and fails the test."""
    try:
        result = dicom_pipeline(data)
    except GatewayError as exc:
        assert exc.reason and str(exc), "a declared error must say what was wrong"
        event(f"{type(exc).__name__}: {exc.reason}")
        return exc.reason
    assert isinstance(result, Result) and result.findings
    event("result")
    return "ok"


@given(st.data())
def test_mutated_headers_end_in_a_result_or_a_declared_error(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(SEED_SYNTAXES))
    mutated = data.draw(header_mutations(seed_dataset(kind)))
    blob = _serialise(mutated, implicit=kind == uid.ImplicitVRLittleEndian)
    if blob is None:
        event("pydicom refused to write the mutation")
    else:
        _outcome(blob)


@given(st.data())
def test_mutated_bytes_end_in_a_result_or_a_declared_error(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(SEED_SYNTAXES))
    _outcome(data.draw(byte_mutations(seed_bytes(kind))))


@given(st.data())
def test_mutated_headers_and_bytes_end_in_a_result_or_a_declared_error(
        data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(SEED_SYNTAXES))
    blob = _serialise(data.draw(header_mutations(seed_dataset(kind))),
                      implicit=kind == uid.ImplicitVRLittleEndian)
    if blob is not None:
        _outcome(data.draw(byte_mutations(blob)))


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_clearly(blob: bytes) -> None:
    assert _outcome(blob) != "ok"


def deflated(meta_source: Dataset, body: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian file: ``meta_source``'s file meta, then ``body``
    (an explicit VR little endian data set) deflated."""
    meta = copy.deepcopy(meta_source.file_meta)
    meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + deflater.compress(body) + deflater.flush()


@settings(deadline=None)  # building a 64 MiB bomb here is slow; the gateway's part is timed
@given(st.integers(0, 64 << 20), st.sampled_from([b"\x10\x00\x10\x00PN", b"\xe0\x7f\x10\x00OB"]))
def test_deflated_data_sets_inflate_within_the_bound(size: int, header: bytes) -> None:
    """A deflate bomb (kilobytes that inflate to tens of megabytes of one element) is refused
    before pydicom inflates it whole; a small one is read (and refused for what it lacks)."""
    if header.endswith(b"OB"):
        element = header + b"\0\0" + size.to_bytes(4, "little")
    else:
        element = header + min(size, 0xFFFE).to_bytes(2, "little")
        size = min(size, 0xFFFE)
    blob = deflated(seed_dataset(uid.ExplicitVRLittleEndian), element + bytes(size))
    start = time.perf_counter()
    reason = _outcome(blob)
    assert time.perf_counter() - start < 2.0
    assert (reason == "inflated_too_large") == (size + len(element) > MAX_INFLATED), reason
