"""The DIMSE edge spools a received data set as received: its Part-10 bytes, built without
pydicom's writer, are pynetdicom's ``event.encoded_dataset()`` byte for byte (checked on real
associations, in the transfer syntaxes and UID lengths peers send), and the spooled file holds
the sent elements and pixel data unchanged (Triton faked)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from services.gateway.dicom.parsing import part10_bytes
from services.gateway.edges.dimse import _spooled_bytes
from services.net import free_port
from tests.gateway.test_dimse import _Stack
from tests.gateway.util import make_instance

CR = "1.2.840.10008.5.1.4.1.1.1"


def _with_uid(seed: int, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> Any:
    ds = make_instance(seed, size=16)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def test_spooled_bytes_equal_pynetdicom_encoded_dataset_on_real_associations() -> None:
    seen: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()

    def on_store(event: Event) -> int:
        ours, theirs = _spooled_bytes(event), event.encoded_dataset()
        with lock:
            seen.append((ours, theirs))
        return 0x0000

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]
    scp = AE(ae_title="SCP")
    scp.add_supported_context(CR, syntaxes)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    sent = 0
    try:
        for syntax in syntaxes:
            scu = AE(ae_title="SCU")
            scu.requested_contexts = [build_context(CR, [syntax])]
            assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            # UIDs of odd and even length, short and the full 64 characters
            for k, uid in enumerate(["1.2.3", "1.2.34", "1.2.840.99999.1.2.3.4.5.6.7",
                                     "2.25." + "1" * 59, "2.25." + "1" * 58]):
                status = assoc.send_c_store(_with_uid(k, uid, syntax))
                assert int(status.Status) == 0x0000
                sent += 1
            assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == sent == 15
    for ours, theirs in seen:
        assert ours[128:132] == b"DICM" and len(ours) > 300
        assert ours == theirs


def test_a_uid_that_is_not_digits_and_dots_falls_back_to_pynetdicom() -> None:
    args = ("1.2.3", "1.2.3", ExplicitVRLittleEndian, "1.2.826.0.1", "X_1")
    assert part10_bytes(b"data", *args) is not None
    assert part10_bytes(b"data", args[0], "1.2.3\x00x", *args[2:]) is None
    assert part10_bytes(b"data", *args[:4], "VERSION\x07") is None


def test_spooled_file_holds_the_sent_elements_and_pixel_data(tmp_path: Path) -> None:
    stack = _Stack(tmp_path)
    stack.server.start()  # worker not started: the spooled file stays for the test to read
    try:
        sent = _with_uid(3, "1.2.826.0.1.3680043.8.498.12345")
        statuses = [int(r.Status) for r in stack.send(sent)]
        assert statuses == [0x0000]
        [path] = stack.spool.pending()
        spooled = pydicom.dcmread(path)
    finally:
        stack.server.stop()
    # the syntax the association negotiated (pynetdicom's SCU may re-encode in another)
    assert spooled.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian)
    assert spooled.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert spooled.file_meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert spooled.PixelData == sent.PixelData
    assert [e.tag for e in spooled] == [e.tag for e in sent]
    for element in sent:
        assert spooled[element.tag].value == element.value, element.keyword
