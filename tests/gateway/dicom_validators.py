"""The DICOM validators our SR and SEG objects are checked with, and the findings we judge wrong.

- dciodvfy (Debian dicom3tools): IOD, module and attribute rules; one process per file.
- PixelMed's DicomSRValidator (IOD and SR templates, e.g. TID 1500; run with its strictest
  options: code meaning case, ambiguous templates, content item order, template identifiers)
  and DicomInstanceValidator (IODs, SEG among them; not SR) from Debian pixelmed-apps /
  libpixelmed-java, the validators IHE Connectathons use for AI Results. Building a validator
  compiles its XSLT (seconds), so ``pixelmed`` validates every file in one JVM
  (``PixelMedBatch.java``, run by Java's source launcher, which needs a JDK:
  openjdk-17-jdk-headless). On Java 17 the XPath limits must be lifted or the validators stop
  on them.

Both report one finding per line, starting "Error" or "Warning". A test fails on every finding
except those listed in ``ALLOWED``: each names the validator, the exact finding, the condition
under which it is wrong for the object at hand, and the standard's text that says why. Nothing
else is tolerated, warnings included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

DCIODVFY = "/usr/bin/dciodvfy"
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
BATCH = Path(__file__).with_name("PixelMedBatch.java")
JAVA_XPATH_LIMITS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                     "-Djdk.xml.xpathTotalOpLimit=0")
# A short batch: the client compiler only and the serial collector halve its CPU time.
JAVA_FAST_START = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
PROCESSING_ALGORITHM = ("1630", "99IHE")


@dataclass(frozen=True)
class Allowance:
    """A validator finding judged wrong for objects where ``applies`` holds."""

    tool: str  # "dciodvfy" or "pixelmed"
    finding: str  # the finding line, exactly
    applies: Callable[[Dataset], bool]
    why: str  # the standard's text


def _declares(designator: str) -> Callable[[Dataset], bool]:
    return lambda ds: any(item.CodingSchemeDesignator == designator
                          for item in ds.get("CodingSchemeIdentificationSequence", []))


def _device_uid_only_in_algorithm_item(ds: Dataset) -> bool:
    """Device UID appears in the Contributing Equipment Sequence's Processing Algorithm item
    (and not in any other item)."""
    items = ds.get("ContributingEquipmentSequence", [])
    with_uid = [i for i in items if "DeviceUID" in i]
    return len(with_uid) == 1 and _purpose(with_uid[0]) == PROCESSING_ALGORITHM


def _purpose(item: Dataset) -> tuple[str, str]:
    code = item.PurposeOfReferenceCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _two_orientation_values(ds: Dataset) -> bool:
    value = ds.get("PatientOrientation")
    return value is not None and len(value) == 2


def _derivation_in_every_frame(ds: Dataset) -> bool:
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    return (bool(frames) and all("DerivationImageSequence" in f for f in frames)
            and "DerivationImageSequence" not in shared)


def _no_laterality_known(ds: Dataset) -> bool:
    """The SEG carries no laterality because its sources carry none: the tests mark such
    sources by leaving all three laterality attributes out (``Laterality``, ``Image
    Laterality``, and Frame Laterality of an enhanced source)."""
    return "Laterality" not in ds and "ImageLaterality" not in ds


ALLOWED: tuple[Allowance, ...] = (
    Allowance(
        "dciodvfy",
        "Warning - Unrecognized defined term <99BEDSIDE> for value 1 of attribute "
        "<Coding Scheme Designator>",
        _declares("99BEDSIDE"),
        "Labels are coded in the local scheme 99BEDSIDE, which dciodvfy cannot know. PS3.3 "
        "C.12.1 (SOP Common), Coding Scheme Identification Sequence: \"Sequence of items that "
        "map values of Coding Scheme Designator (0008,0102) to an external coding system "
        "registration, or to a private or local coding scheme.\" The objects declare 99BEDSIDE "
        "there."),
    Allowance(
        "dciodvfy",
        "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI "
        "Device UID ",
        _device_uid_only_in_algorithm_item,
        "IHE AI Results asks the Contributing Equipment item of the processing algorithm to "
        "carry the algorithm's Device UID (0018,1002); dciodvfy's tables (2022) do not list "
        "Device UID among that sequence's attributes, so it reports a standard attribute "
        "outside the IOD: a Standard Extended SOP Class (PS3.4 B.1.3 lets one add Type 3 "
        "standard attributes), which is what the next line says."),
    Allowance(
        "dciodvfy",
        "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this "
        "is a Standard Extended SOP Class",
        _device_uid_only_in_algorithm_item,
        "The summary of the Device UID line above (accepted only together with it: "
        "``problems`` fails when this line comes with any other attribute)."),
    Allowance(
        "pixelmed",
        "Error: GeneralImageModule/PatientOrientation/: PatientOrientation: Incorrect value "
        "multiplicity - got 2 but expected 1-1",
        _two_orientation_values,
        "PixelMed's SEG rule expects one value. PS3.6 gives Patient Orientation (0020,0020) "
        "VM 2, and PS3.3 C.7.6.1.1.1: \"The Patient Orientation (0020,0020) relative to the "
        "image plane shall be specified by two values that designate the anatomical direction "
        "of the positive row axis (left to right) and the positive column axis (top to "
        "bottom).\" The SEG of a radiograph copies the source's two values."),
    Allowance(
        "pixelmed",
        "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/"
        "Item[1]/: Missing required sequence attribute (Type 2)",
        _derivation_in_every_frame,
        "PixelMed checks the Derivation Image macro in the shared item although every "
        "per-frame item carries it (highdicom writes it per frame). PS3.3 C.7.6.16, Shared "
        "Functional Groups Sequence: it \"contains the Functional Group Macros that are shared "
        "for all frames ... The selected Functional Group Macros shall not be present in the "
        "Per-frame Functional Groups Sequence (5200,9230).\" A macro lives in one of the two, "
        "so its absence from the shared item is required, not an error."),
    Allowance(
        "pixelmed",
        "Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute",
        _no_laterality_known,
        "PixelMed requires Laterality whenever Image and Frame Laterality are absent. PS3.3 "
        "C.7.3.1: Laterality (0020,0060), Type 2C, \"Required if the body part examined is a "
        "paired structure and Image Laterality (0020,0062) or Frame Laterality (0020,9072) or "
        "Measurement Laterality (0024,0113) are not present.\" and PS3.5 7.4.4: \"When the "
        "specified conditions are not met, Type 2C elements shall not be included in the Data "
        "Set.\" A SEG copies laterality from its source; where the source says nothing (a CT "
        "of the chest, an unpaired structure) nothing is invented."),
)


def problems(tool: str, lines: Sequence[str], ds: Dataset) -> list[str]:
    """The findings of ``tool`` on ``ds`` that no allowance covers."""
    findings = [line for line in lines if line.startswith(("Error", "Warning"))]
    allowed = {a.finding for a in ALLOWED if a.tool == tool and a.applies(ds)}
    left = [line for line in findings if line not in allowed]
    extended = [line for line in findings if "not present in standard DICOM IOD - (" in line]
    if tool == "dciodvfy" and len(extended) > 1:  # the summary covers one attribute only
        left.extend(extended)
    return left


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report of one file, every line."""
    if shutil.which(DCIODVFY) is None:
        pytest.fail("dciodvfy is missing: apt-get install dicom3tools (scripts/dev.sh setup)")
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0 or any(line.startswith(("Error", "Warning")) for line in lines), \
        f"dciodvfy failed without a finding: {lines}"
    return lines


def dciodvfy_problems(ds: Dataset, path: Path) -> list[str]:
    """Write ``ds`` to ``path`` and return dciodvfy's findings that count."""
    ds.save_as(path, enforce_file_format=True)
    return problems("dciodvfy", dciodvfy(path), ds)


def pixelmed_missing() -> str | None:
    """Why PixelMed's validators cannot run here, or None."""
    if shutil.which("java") is None or shutil.which("javac") is None:
        return ("Java (a JDK: the batch runner uses Java's source launcher) is missing: "
                "apt-get install openjdk-17-jdk-headless (scripts/dev.sh setup)")
    if not PIXELMED_JAR.exists():
        return ("PixelMed's validators are missing: apt-get install pixelmed-apps "
                "libpixelmed-java (scripts/dev.sh setup)")
    return None


def pixelmed(paths: Sequence[Path]) -> dict[Path, list[str]]:
    """PixelMed's report per file, all files in one JVM."""
    why = pixelmed_missing()
    if why is not None:
        pytest.skip(why)
    run = subprocess.run(
        ["java", *JAVA_XPATH_LIMITS, *JAVA_FAST_START, "-cp", str(PIXELMED_JAR),
         str(BATCH), *map(str, paths)], capture_output=True, text=True, timeout=300)
    reports: dict[Path, list[str]] = {}
    current: list[str] | None = None
    for line in run.stdout.splitlines():
        match = re.fullmatch(r"=== FILE (.*)", line)
        if match:
            current = reports.setdefault(Path(match.group(1)), [])
        elif current is not None:
            current.append(line)
    assert run.returncode == 0 and set(reports) == set(paths), \
        f"PixelMed batch failed (rc {run.returncode}): {run.stderr[-2000:]}"
    return reports
