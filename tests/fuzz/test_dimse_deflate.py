"""Regression (found while fuzzing the parser's deflate bound): pynetdicom inflates a
Deflated Explicit VR Little Endian C-STORE data set whole, so a few hundred kilobytes on the
wire became hundreds of megabytes in the gateway. The DIMSE edge now counts the inflated size
first: 0xA700 (out of resources), memory stays bound, and the gateway keeps serving."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context

from services.gateway.dicom.parsing import MAX_INFLATED_BYTES
from tests.fuzz.bounds import within_memory
from tests.gateway.harness import fake_gateway

CR = UID("1.2.840.10008.5.1.4.1.1.1")


def _bomb(path: Path, inflated: int) -> None:
    """A Part-10 file: CR file meta, then SOP Class and Instance UIDs and one Pixel Data
    element of ``inflated`` zero bytes, deflated (written in 1 MiB steps: the test never holds
    the inflated size)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    head = Dataset()
    head.SOPClassUID, head.SOPInstanceUID = CR, meta.MediaStorageSOPInstanceUID
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, head)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM" + fp.getvalue())
        out.write(deflater.compress(body.getvalue() + b"\xe0\x7f\x10\x00OB\0\0"
                                    + inflated.to_bytes(4, "little")))
        zeros = bytes(1 << 20)
        for _ in range(inflated >> 20):
            out.write(deflater.compress(zeros))
        out.write(deflater.flush())


def test_deflate_bomb_over_dimse_is_refused_with_fake_triton(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the client sends the file's bytes as they are (else pynetdicom would inflate them here)
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    bomb = tmp_path / "bomb.dcm"
    _bomb(bomb, MAX_INFLATED_BYTES + (1 << 20))
    assert bomb.stat().st_size < 2 << 20  # kilobytes on the wire
    gateway = fake_gateway(tmp_path)
    try:
        ae = AE(ae_title="FUZZSCU")
        ae.requested_contexts = [build_context(CR, DeflatedExplicitVRLittleEndian),
                                 build_context("1.2.840.10008.1.1")]
        assoc = ae.associate("127.0.0.1", gateway.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        try:
            status = within_memory(128 << 20, lambda: assoc.send_c_store(bomb))
            assert int(status.Status) == 0xA700, status
            assert int(assoc.send_c_echo().Status) == 0x0000  # still serving
        finally:
            assoc.release()
    finally:
        gateway.stop()
