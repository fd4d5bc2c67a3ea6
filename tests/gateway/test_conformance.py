"""The README's "What the gateway accepts" is ``bedside conformance``'s output, and that output
says what the code does (the DIMSE listener's contexts, the decoders, the image classes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pynetdicom import AE

from services.gateway.dicom import conformance
from services.gateway.dicom.sop_classes import image_sop_classes

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_section_is_the_commands_output() -> None:
    printed = subprocess.run([sys.executable, "-m", "services.cli", "conformance"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert printed == conformance.markdown()
    section = conformance.section_of((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section, "README.md has no conformance section: paste `bedside conformance` there"
    assert section == printed, "README.md's conformance section is stale: paste " \
        "`bedside conformance` over it"


def test_the_section_names_what_the_code_accepts() -> None:
    text = conformance.markdown()
    for ts, who in (("1.2.840.10008.1.2.4.70", "GDCM"), ("1.2.840.10008.1.2.4.57", "GDCM"),
                    ("1.2.840.10008.1.2.4.51", "GDCM"), ("1.2.840.10008.1.2.4.50", "pillow"),
                    ("1.2.840.10008.1.2.4.80", "pyjpegls"),
                    ("1.2.840.10008.1.2.4.90", "pylibjpeg-openjpeg")):
        row = next(line for line in text.splitlines() if f"`{ts}`" in line)
        assert who in row, row
    assert "`1.2.840.10008.1.2.4.100`" not in text  # MPEG-2: no decoder
    assert "| X-Ray Angiographic Image Storage | `1.2.840.10008.5.1.4.1.1.12.1` |" in text
    assert "| Ultrasound Image Storage | `1.2.840.10008.5.1.4.1.1.6.1` |" in text
    assert "`1.2.840.10008.5.1.4.1.1.88.22`" not in text  # Enhanced SR
    assert text.count("\n| ") - 2 == len(image_sop_classes()) + 13  # rows: classes + syntaxes


def test_a_section_is_found_only_between_both_markers() -> None:
    body = f"intro\n{conformance.BEGIN}\nx\n{conformance.END}\nrest\n"
    assert conformance.section_of(body) == f"{conformance.BEGIN}\nx\n{conformance.END}\n"
    assert conformance.section_of(f"intro\n{conformance.BEGIN}\nx\n") == ""


def test_the_dimse_listener_offers_these_syntaxes_for_an_image_class(tmp_path: Path) -> None:
    from tests.gateway.harness import fake_gateway

    gw = fake_gateway(tmp_path)
    try:
        for ts, accepted in (("1.2.840.10008.1.2.4.70", True), ("1.2.840.10008.1.2.4.51", True),
                             ("1.2.840.10008.1.2.4.57", True), ("1.2.840.10008.1.2.4.100", False)):
            ae = AE(ae_title="UNITSCU")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.12.1", ts)  # XA
            assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title=gw.config.ae_title)
            try:
                assert bool(assoc.is_established and assoc.accepted_contexts) == accepted, ts
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        gw.stop()
