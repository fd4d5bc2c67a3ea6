"""De-identification (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile)
of what leaves the gateway, and re-identification of what comes back.

UIDs are replaced by ``2.25.<n>`` UIDs derived with HMAC-SHA256 from the original and a
secret: the same original always maps to the same replacement (across instances, series,
associations and restarts), so a study stays a study and results map back. The reverse map is
kept in SQLite beside the spool (file mode 0600) for re-identification.

The profile's combined actions are resolved without IOD-specific knowledge, conservatively:
any combination containing Z becomes Z (an empty value keeps Type 2 attributes valid), except
for sequences, which become X (they are Type 3 in image IODs, where an empty sequence is
invalid: dciodvfy says so), X/D becomes X, and UID actions (U, X/Z/U*) become U.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

STANDARD_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes, coding schemes: kept
METHOD = "DICOM PS3.15 Basic Profile (Bedside)"  # LO: at most 64 characters

# PS3.15 Table E.1-1, basic profile column, for the attributes image objects commonly carry
# (tests/gateway/test_deid_conformance.py checks each against its own copy of the table).
# Z: empty, X: remove, D: dummy value, U: consistent new UID. Combined actions resolved as the
# module docstring says (the original action is in the comment where it was combined).
ACTIONS: dict[int, str] = {
    0x00080014: "U",  # Instance Creator UID
    0x00080018: "U",  # SOP Instance UID
    0x00080020: "Z",  # Study Date
    0x00080021: "X",  # Series Date (X/D)
    0x00080022: "Z",  # Acquisition Date (X/Z)
    0x00080023: "Z",  # Content Date (Z/D)
    0x0008002A: "Z",  # Acquisition DateTime (X/Z/D)
    0x00080030: "Z",  # Study Time
    0x00080031: "X",  # Series Time (X/D)
    0x00080032: "Z",  # Acquisition Time (X/Z)
    0x00080033: "Z",  # Content Time (Z/D)
    0x00080050: "Z",  # Accession Number
    0x00080080: "Z",  # Institution Name (X/Z/D)
    0x00080081: "X",  # Institution Address
    0x00080082: "X",  # Institution Code Sequence (X/Z/D)
    0x00080090: "Z",  # Referring Physician's Name
    0x00080092: "X",  # Referring Physician's Address
    0x00080094: "X",  # Referring Physician's Telephone Numbers
    0x00080096: "X",  # Referring Physician Identification Sequence
    0x00080201: "X",  # Timezone Offset From UTC
    0x00081010: "Z",  # Station Name (X/Z/D)
    0x00081030: "X",  # Study Description
    0x0008103E: "X",  # Series Description
    0x00081040: "X",  # Institutional Department Name
    0x00081048: "X",  # Physician(s) of Record
    0x00081049: "X",  # Physician(s) of Record Identification Sequence
    0x00081050: "X",  # Performing Physicians' Name
    0x00081052: "X",  # Performing Physician Identification Sequence
    0x00081060: "X",  # Name of Physician(s) Reading Study
    0x00081070: "Z",  # Operators' Name (X/Z/D)
    0x00081072: "X",  # Operator Identification Sequence (X/D)
    0x00081080: "X",  # Admitting Diagnoses Description
    0x00081110: "X",  # Referenced Study Sequence (X/Z)
    0x00081111: "X",  # Referenced Performed Procedure Step Sequence (X/Z/D)
    0x00081120: "X",  # Referenced Patient Sequence
    0x00081155: "U",  # Referenced SOP Instance UID
    0x00082111: "X",  # Derivation Description
    0x00100010: "Z",  # Patient's Name
    0x00100020: "Z",  # Patient ID
    0x00100021: "X",  # Issuer of Patient ID
    0x00100030: "Z",  # Patient's Birth Date
    0x00100032: "X",  # Patient's Birth Time
    0x00100040: "Z",  # Patient's Sex
    0x00100050: "X",  # Patient's Insurance Plan Code Sequence
    0x00101000: "X",  # Other Patient IDs
    0x00101001: "X",  # Other Patient Names
    0x00101002: "X",  # Other Patient IDs Sequence
    0x00101005: "X",  # Patient's Birth Name
    0x00101010: "X",  # Patient's Age
    0x00101020: "X",  # Patient's Size
    0x00101030: "X",  # Patient's Weight
    0x00101040: "X",  # Patient's Address
    0x00101060: "X",  # Patient's Mother's Birth Name
    0x00101080: "X",  # Military Rank
    0x00101081: "X",  # Branch of Service
    0x00101090: "X",  # Medical Record Locator
    0x00102000: "X",  # Medical Alerts
    0x00102110: "X",  # Allergies
    0x00102150: "X",  # Country of Residence
    0x00102152: "X",  # Region of Residence
    0x00102154: "X",  # Patient's Telephone Numbers
    0x00102160: "X",  # Ethnic Group
    0x00102180: "X",  # Occupation
    0x001021A0: "X",  # Smoking Status
    0x001021B0: "X",  # Additional Patient History
    0x001021C0: "X",  # Pregnancy Status
    0x001021F0: "X",  # Patient's Religious Preference
    0x00102297: "X",  # Responsible Person
    0x00102299: "X",  # Responsible Organization
    0x00104000: "X",  # Patient Comments
    0x00180010: "Z",  # Contrast/Bolus Agent (Z/D)
    0x00181000: "Z",  # Device Serial Number (X/Z/D)
    0x00181004: "X",  # Plate ID
    0x00181005: "X",  # Generator ID
    0x00181007: "X",  # Cassette ID
    0x00181008: "X",  # Gantry ID
    0x00181030: "X",  # Protocol Name (X/D)
    0x00181200: "X",  # Date of Last Calibration
    0x00181201: "X",  # Time of Last Calibration
    0x00181400: "X",  # Acquisition Device Processing Description (X/D)
    0x00184000: "X",  # Acquisition Comments
    0x0018700A: "X",  # Detector ID (X/D)
    0x0020000D: "U",  # Study Instance UID
    0x0020000E: "U",  # Series Instance UID
    0x00200010: "Z",  # Study ID
    0x00200052: "U",  # Frame of Reference UID
    0x00204000: "X",  # Image Comments
    0x00321032: "X",  # Requesting Physician
    0x00321033: "X",  # Requesting Service
    0x00321060: "Z",  # Requested Procedure Description (X/Z)
    0x00380010: "X",  # Admission ID
    0x00380020: "X",  # Admitting Date
    0x00380050: "X",  # Special Needs
    0x00380300: "X",  # Current Patient Location
    0x00380500: "X",  # Patient State
    0x00384000: "X",  # Visit Comments
    0x00400006: "X",  # Scheduled Performing Physician's Name
    0x00400009: "X",  # Scheduled Procedure Step ID
    0x00400243: "X",  # Performed Location
    0x00400244: "X",  # Performed Procedure Step Start Date
    0x00400245: "X",  # Performed Procedure Step Start Time
    0x00400253: "X",  # Performed Procedure Step ID
    0x00400254: "X",  # Performed Procedure Step Description
    0x00400275: "X",  # Request Attributes Sequence
    0x00401001: "X",  # Requested Procedure ID
    0x00402008: "X",  # Order Entered By
    0x0040A027: "X",  # Verifying Organization
    0x0040A075: "D",  # Verifying Observer Name
    0x0040A123: "D",  # Person Name
    0x0040A160: "X",  # Text Value
    0x00700084: "Z",  # Content Creator's Name
    0x00880140: "U",  # Storage Media File-set UID
    0x04000561: "X",  # Original Attributes Sequence
    0x30060024: "U",  # Referenced Frame of Reference UID
}
DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMOUS", "SH": "ANON", "DA": "19000101",
         "TM": "000000", "DT": "19000101000000", "CS": "ANON", "UI": "2.25.0"}
# Copied back from the source on re-identification: what Z/X took from results' headers.
REIDENTIFIED = (0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x00080050, 0x00080020,
                0x00080030, 0x00080090, 0x00200010)


class UidMap:
    """Original <-> replacement UIDs; replacements are HMAC-derived, the reverse is stored."""

    def __init__(self, path: Path, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the de-identification secret must be at least 16 bytes")
        self._secret = secret
        new = not path.exists()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if new:
            os.chmod(path, 0o600)  # the reverse map identifies studies
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS uid_map "
                         "(replacement TEXT PRIMARY KEY, original TEXT NOT NULL)")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def replace(self, uid: str) -> str:
        digest = hmac.new(self._secret, uid.encode("ascii"), hashlib.sha256).digest()
        replacement = f"2.25.{int.from_bytes(digest[:16], 'big')}"
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO uid_map VALUES (?, ?)", (replacement, uid))
        return replacement

    def original(self, replacement: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT original FROM uid_map WHERE replacement = ?",
                                   (replacement,)).fetchone()
        return None if row is None else str(row[0])


@dataclass(frozen=True)
class DeidOptions:
    # private elements kept, as (group, element) tags; all others are removed
    retain_private: tuple[int, ...] = ()


class Deidentifier:
    def __init__(self, uids: UidMap, options: DeidOptions | None = None) -> None:
        self._uids = uids
        self._options = options or DeidOptions()

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (file meta included); ``ds`` is not changed."""
        out = copy.deepcopy(ds)
        self._walk(out)
        if hasattr(out, "file_meta"):
            meta = out.file_meta
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        out.DeidentificationMethodCodeSequence = Sequence([code])
        return out

    def _walk(self, ds: Dataset) -> None:
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                if int(tag) not in self._options.retain_private:
                    del ds[tag]
                continue
            action = ACTIONS.get(int(tag))
            if action is None and elem.VR == "UI" and elem.value:
                action = "U" if not _standard(elem.value) else None
            if action == "X":
                del ds[tag]
            elif action == "Z":
                ds[tag] = DataElement(tag, elem.VR, None if elem.VR != "SQ" else Sequence())
            elif action == "D":
                ds[tag] = DataElement(tag, elem.VR, DUMMY.get(elem.VR, "ANON"))
            elif action == "U":
                values = elem.value if elem.VM > 1 else [elem.value]
                new = [self._uids.replace(str(v)) if v and not _standard(str(v)) else v
                       for v in values]
                ds[tag] = DataElement(tag, "UI", new if elem.VM > 1 else new[0])
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item)

    def reidentify(self, result: Dataset, source: Dataset) -> Dataset:
        """Map replacement UIDs in ``result`` back to the originals, and copy the identifying
        header attributes back from the ``source`` instance (the original, as received)."""
        out = copy.deepcopy(result)
        self._restore(out)
        for tag in REIDENTIFIED:
            if tag in source:
                out[tag] = source[tag]
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod",
                        "DeidentificationMethodCodeSequence"):
            if keyword in out:
                delattr(out, keyword)
        return out

    def _restore(self, ds: Dataset) -> None:
        for elem in list(ds):
            if elem.VR == "UI" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                back = [self._uids.original(str(v)) or v for v in values]
                ds[elem.tag] = DataElement(elem.tag, "UI", back if elem.VM > 1 else back[0])
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._restore(item)


def _standard(uid: object) -> bool:
    return str(uid).startswith(STANDARD_UID_ROOT)
