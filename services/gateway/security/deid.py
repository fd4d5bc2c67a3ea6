"""De-identification (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile)
of what leaves the gateway, and re-identification of what comes back.

UIDs are replaced by ``2.25.<n>`` UIDs derived with HMAC-SHA256 from the original and a
secret: the same original always maps to the same replacement (across instances, series,
associations and restarts), so a study stays a study and results map back.

The reverse map (``UidMap``) is SQLite in WAL mode with ``synchronous=FULL`` beside the spool
(file mode 0600), so it survives restarts and crashes: every replacement made while
de-identifying an instance is committed, in one transaction, before ``deidentify`` returns,
that is before the de-identified copy can leave the gateway; whatever comes back can be mapped
back. It holds, per replaced UID, the original and the original study; per original study, the
least that re-filing a returning object in that study needs (``IDENTITY``: patient name, ID
and its issuer, birth date, sex; accession number, study date, time, ID, referring
physician), nothing else from the instance. Rows not refreshed by a new de-identified copy for
the retention (``prune``) are deleted; an object coming back about such a study is no longer
recognised. One connection behind a lock serves every thread; other processes sharing the file
wait on SQLite's lock (busy timeout).

``Deidentifier.reidentify_returning`` turns an object that comes back (an external reader's
SR, a vendor's SEG) into one that belongs to the original study: every replacement UID in it,
nested references included, is mapped back, the object's own new UIDs are kept, the study is
the original one and the identifying attributes are restored from the map.

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
import time
from collections.abc import Callable, Iterator, Mapping
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
# Kept in the reverse map per original study, to re-file a returning object in it: the Patient
# and General Study module attributes a PACS matches a study and patient on (Type 1 and 2, and
# the Issuer of Patient ID that qualifies the ID). Nothing else of the source is stored.
IDENTITY = (*REIDENTIFIED, 0x00100021)
_DEID_MARKS = ("PatientIdentityRemoved", "DeidentificationMethod",
               "DeidentificationMethodCodeSequence")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS uid_map (replacement TEXT PRIMARY KEY, original TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS study_identity (
    study    TEXT PRIMARY KEY,   -- original Study Instance UID
    identity TEXT NOT NULL,      -- IDENTITY attributes as DICOM JSON
    seen_at  REAL NOT NULL       -- last time a de-identified copy of the study was made
);
"""


class UidMap:
    """Original <-> replacement UIDs; replacements are HMAC-derived, the reverse is stored,
    with each UID's original study and each study's identifying attributes (module docstring).
    Thread-safe: one connection, one lock, one transaction per ``record`` or ``prune``."""

    def __init__(self, path: Path, secret: bytes,
                 clock: Callable[[], float] = time.time, journal: str = "wal") -> None:
        """``journal``: "wal", or "delete" when replicas on several hosts share the spool
        (store/durable.py SHARED_VOLUME)."""
        if len(secret) < 16:
            raise ValueError("the de-identification secret must be at least 16 bytes")
        self._secret = secret
        self._clock = clock
        new = not path.exists()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        if new:
            os.chmod(path, 0o600)  # the reverse map identifies studies
        mode = self._db.execute(f"PRAGMA journal_mode={journal.upper()}").fetchone()[0]
        if str(mode).lower() != journal:
            raise OSError(f"reverse UID map: journal mode {journal} refused ({mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed mapping survives power loss
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(uid_map)")}
        for column, kind in (("study", "TEXT"), ("seen_at", "REAL NOT NULL DEFAULT 0")):
            if column not in columns:  # a map written before results could come back
                self._db.execute(f"ALTER TABLE uid_map ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def replacement(self, uid: str) -> str:
        """The replacement of ``uid`` (pure: nothing is recorded)."""
        digest = hmac.new(self._secret, uid.encode("ascii"), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    def replace(self, uid: str) -> str:
        """The replacement of ``uid``, recorded at once (no study known)."""
        replacement = self.replacement(uid)
        self.record({replacement: uid}, None, None)
        return replacement

    def record(self, pairs: Mapping[str, str], study: str | None,
               identity: Dataset | None) -> None:
        """Replacement -> original pairs met while de-identifying one instance of the original
        ``study``, and that study's ``identity`` attributes, in one durable transaction."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO uid_map (replacement, original, study, seen_at) VALUES"
                    " (?, ?, ?, ?) ON CONFLICT (replacement) DO UPDATE SET"
                    " study = COALESCE(excluded.study, study), seen_at = excluded.seen_at",
                    [(r, o, study, now) for r, o in pairs.items()])
                if study is not None and identity is not None:
                    self._db.execute(
                        "INSERT INTO study_identity VALUES (?, ?, ?) ON CONFLICT (study) DO"
                        " UPDATE SET identity = excluded.identity, seen_at = excluded.seen_at",
                        (study, identity.to_json(), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def original(self, replacement: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT original FROM uid_map WHERE replacement = ?",
                                   (replacement,)).fetchone()
        return None if row is None else str(row[0])

    def study_of(self, replacement: str) -> str | None:
        """The original study in which ``replacement`` was made, when known."""
        with self._lock:
            row = self._db.execute("SELECT study FROM uid_map WHERE replacement = ?",
                                   (replacement,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def identity(self, study: str) -> Dataset | None:
        """The identifying attributes kept for the original ``study``, or None."""
        with self._lock:
            row = self._db.execute("SELECT identity FROM study_identity WHERE study = ?",
                                   (study,)).fetchone()
        return None if row is None else Dataset.from_json(str(row[0]))

    def prune(self, retention_s: float) -> int:
        """Delete the studies (and UID rows) not de-identified again for ``retention_s``
        seconds; returns how many studies went."""
        cutoff = self._clock() - retention_s
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._db.execute("DELETE FROM study_identity WHERE seen_at < ?",
                                        (cutoff,)).rowcount
                self._db.execute("DELETE FROM uid_map WHERE seen_at < ?", (cutoff,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(gone)


@dataclass(frozen=True)
class DeidOptions:
    # private elements kept, as (group, element) tags; all others are removed
    retain_private: tuple[int, ...] = ()


class Deidentifier:
    def __init__(self, uids: UidMap, options: DeidOptions | None = None) -> None:
        self._uids = uids
        self._options = options or DeidOptions()

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (file meta included); ``ds`` is not changed. Its
        replacement UIDs and the study's ``IDENTITY`` attributes are in the reverse map,
        committed, when this returns."""
        out = copy.deepcopy(ds)
        pairs: dict[str, str] = {}
        self._walk(out, pairs)
        study = str(ds.get("StudyInstanceUID", "") or "") or None
        self._uids.record(pairs, study, _identity(ds) if study is not None else None)
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

    def _walk(self, ds: Dataset, pairs: dict[str, str]) -> None:
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
                new = [self._replace(str(v), pairs) if v and not _standard(str(v)) else v
                       for v in values]
                ds[tag] = DataElement(tag, "UI", new if elem.VM > 1 else new[0])
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, pairs)

    def _replace(self, uid: str, pairs: dict[str, str]) -> str:
        replacement = self._uids.replacement(uid)
        pairs[replacement] = uid
        return replacement

    def reidentify(self, result: Dataset, source: Dataset) -> Dataset:
        """Map replacement UIDs in ``result`` back to the originals, and copy the identifying
        header attributes back from the ``source`` instance (the original, as received)."""
        out = copy.deepcopy(result)
        self._restore(out)
        for tag in REIDENTIFIED:
            if tag in source:
                out[tag] = source[tag]
        for keyword in _DEID_MARKS:
            if keyword in out:
                delattr(out, keyword)
        return out

    def original_study(self, ds: Dataset) -> str | None:
        """The original study an object that came back is about, when the reverse map knows
        it: its own Study Instance UID's original, else the original study of the replacement
        UIDs it references (the first referenced, when they span several studies of one
        patient, e.g. a comparison with a prior). None: not about anything de-identified here
        (or about a study past the map's retention). Raises ``AmbiguousReturn`` when its own
        study and the studies it references are not all one patient's (every reference is
        mapped back on re-identification, so one into another patient's study would carry
        that patient's UIDs into this one's record)."""
        found: dict[str, Dataset] = {}
        own = self._uids.original(str(ds.get("StudyInstanceUID", "") or ""))
        own_identity = self._uids.identity(own) if own is not None else None
        if own is not None and own_identity is not None:
            found[own] = own_identity
        for uid in _referenced_uids(ds):
            study = self._uids.study_of(uid)
            if study is None or study in found:
                continue
            identity = self._uids.identity(study)
            if identity is not None:
                found[study] = identity
        patients = {(str(i.get("PatientID", "")), str(i.get("IssuerOfPatientID", "")))
                    for i in found.values()}
        if len(patients) > 1:
            raise AmbiguousReturn(len(patients))
        return next(iter(found), None)

    def reidentify_returning(self, ds: Dataset) -> Dataset | None:
        """A re-identified copy of an object that came back about a de-identified study (see
        ``original_study``), or None when it is not about one. Replacement UIDs anywhere in
        it (file meta, references at any depth) become the originals; UIDs the map does not
        know (the object's own new series and instance) are kept; its Study Instance UID is
        the original study's; the ``IDENTITY`` attributes are the original study's (absent
        there: emptied here); the de-identification marks are removed."""
        study = self.original_study(ds)
        if study is None:
            return None
        identity = self._uids.identity(study)
        assert identity is not None  # original_study checked it
        out = copy.deepcopy(ds)
        self._restore(out)
        if hasattr(out, "file_meta"):
            self._restore(out.file_meta)
        out.StudyInstanceUID = study
        for tag in IDENTITY:
            if tag in identity:
                out[tag] = identity[tag]
            elif tag in out:
                out[tag] = DataElement(tag, out[tag].VR, None)
        for keyword in _DEID_MARKS:
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


class AmbiguousReturn(ValueError):
    """An object that came back references de-identified studies of several patients."""

    def __init__(self, patients: int) -> None:
        super().__init__(f"the object references de-identified studies of {patients} "
                         "patients; a result coming back must be about one")


def _identity(ds: Dataset) -> Dataset:
    kept = Dataset()
    for tag in IDENTITY:
        if tag in ds:
            kept[tag] = ds[tag]
    return kept


def _referenced_uids(ds: Dataset) -> Iterator[str]:
    """Every non-standard UID value inside the sequences of ``ds``, at any depth (references:
    ReferencedSeriesSequence, CurrentRequestedProcedureEvidenceSequence, SourceImageSequence,
    per-frame functional groups, SR content items...)."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            for inner in item:
                if inner.VR == "UI" and inner.value:
                    values = inner.value if inner.VM > 1 else [inner.value]
                    yield from (str(v) for v in values if v and not _standard(v))
            yield from _referenced_uids(item)


def _standard(uid: object) -> bool:
    return str(uid).startswith(STANDARD_UID_ROOT)
