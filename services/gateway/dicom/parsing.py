"""DICOM bytes -> a fully read, bounded data set, or a gateway error saying why.

Every edge and the worker read instances through ``parse``; the DIMSE edge calls
``check_inflated`` itself on a deflated data set before pynetdicom inflates it. Nothing here
logs patient data: ``parse`` records hashed UIDs into the current request's audit record only.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from services.gateway.errors import GatewayError, InvalidInstance, PayloadTooLarge
from services.gateway.security import audit


def read_leniently() -> None:
    """Malformed values must not be echoed into warnings or logs (they may be patient data):
    pydicom reads without validating, and the checks here reject what cannot be used."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


# A deflated data set is inflated whole by pydicom: without a bound, a few hundred kilobytes of
# zeros inflate to gigabytes (found by tests/fuzz). 256 MiB is 4x the default request limit.
MAX_INFLATED_BYTES = 256 * 1024 * 1024


def check_inflated(deflated: bytes, limit: int = MAX_INFLATED_BYTES) -> None:
    """PayloadTooLarge if the raw deflate stream ``deflated`` inflates to more than ``limit``
    bytes; inflation stops at the limit, so memory stays bound. pydicom and pynetdicom inflate
    a Deflated Explicit VR Little Endian data set whole: call this first."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated, pending = 0, deflated
    while inflated <= limit:  # 1 MiB at a time: only the count is kept
        try:
            chunk = inflater.decompress(pending, 1 << 20)
        except zlib.error:
            return  # not a deflate stream: the reader says what is wrong with it
        inflated += len(chunk)
        pending = inflater.unconsumed_tail
        if not chunk and not pending:  # all input used and all output returned
            break
    if inflated > limit:
        raise PayloadTooLarge(f"the deflated data set inflates to more than {limit} bytes",
                              "inflated_too_large")


def _check_inflated_size(data: bytes, limit: int) -> None:
    """``check_inflated`` on a Part-10 file's data set, if its transfer syntax is deflated."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        check_inflated(data[fp.tell():], limit)


def parse(data: bytes, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """DICOM Part-10 bytes -> dataset, fully read, or InvalidInstance saying why
    (PayloadTooLarge for a deflated data set that inflates beyond ``max_inflated_bytes``)."""
    try:
        _check_inflated_size(data, max_inflated_bytes)
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except GatewayError:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstance("not a DICOM Part-10 file: expected a 128-byte preamble, 'DICM' "
                              "and the File Meta Information (PS3.10 7.1)", "not_dicom") from exc
    except Exception as exc:  # truncated elements raise EOFError, OSError, ValueError...
        raise InvalidInstance(f"unreadable DICOM file: {client_text(exc)}",
                              "unreadable") from exc
    audit.note_dataset(ds)  # hashed UIDs into the current request's audit record, if any
    return ds


def shown_uid(value: str) -> str:
    """A UID as it may be quoted back to a client: itself when well formed, else a note (a
    garbled value is not echoed)."""
    if not value:
        return "(none)"
    return value if UID(value).is_valid else "(not a valid UID)"


_ADVICE = re.compile(r"[^.]*\bforce\s*=\s*True\b[^.]*\.?", re.I)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def client_text(exc: BaseException, limit: int = 200) -> str:
    """A library's error message as a client may read it: without pydicom's advice to read
    with ``force=True`` (a reader's option, not the client's), printable ASCII only, short."""
    text = _UNPRINTABLE.sub("?", _ADVICE.sub("", str(exc))).strip()
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_native_length(ds: Dataset) -> None:
    """Uncompressed Pixel Data shorter than its header describes is a truncated instance:
    refused before the acknowledgement rather than failing in the worker afterwards."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if ts.is_compressed:
        return
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1)) * (int(ds.BitsAllocated) // 8))
    held = len(ds.PixelData)
    if held < expected:
        raise InvalidInstance(f"Pixel Data holds {held} bytes where the header describes "
                              f"{expected}: the instance is truncated", "truncated_pixel_data")


_UID_TEXT = re.compile(r"[0-9.]{1,64}")
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    return _short(0x0002, element, b"UI", raw + b"\x00" * (len(raw) % 2))


def part10_bytes(dataset: bytes | memoryview, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax: str, implementation_uid: str,
                 implementation_version: str) -> bytes | None:
    """The Part-10 file a DIMSE edge spools for a received data set: preamble, "DICM", the File
    Meta Information (group length, version 00 01, Media Storage SOP Class and Instance, Transfer
    Syntax, Implementation Class UID and Version Name, in tag order, Explicit VR Little Endian),
    then the data set's bytes as received. Byte for byte what pynetdicom's
    ``Event.encoded_dataset()`` writes (the tests compare them), at a tenth of its cost (it builds
    a pydicom data set and runs pydicom's writer for seven elements). None when a UID is not
    plain digits and dots or the version name not plain text, so that the caller uses
    pynetdicom's own encoding for such a peer."""
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid)
    if not all(_UID_TEXT.fullmatch(u) for u in uids):
        return None
    if not implementation_version.isascii() or not implementation_version.isprintable() \
            or len(implementation_version) > 16:
        return None
    version = implementation_version.encode("ascii")
    version += b" " * (len(version) % 2)
    body = b"".join((
        struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
        _ui(0x0002, sop_class_uid), _ui(0x0003, sop_instance_uid),
        _ui(0x0010, transfer_syntax), _ui(0x0012, implementation_uid),
        _short(0x0002, 0x0013, b"SH", version),
    ))
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((_PREAMBLE, length, body, dataset))
