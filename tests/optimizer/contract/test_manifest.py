from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest
from tests.conftest import TINY_MANIFEST


def _dict() -> dict[str, Any]:
    return json.loads(json.dumps(TINY_MANIFEST.to_dict()))


def test_round_trip_through_json(tmp_path: Path) -> None:
    TINY_MANIFEST.save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json") == TINY_MANIFEST


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("name"), "manifest.name: missing"),
        (lambda d: d.update(task="detection"), "manifest.task"),
        (lambda d: d["output"].update(thresholds=[0.5, 0.6]), "one threshold per label"),
        (lambda d: d["output"].update(activation="relu"), "manifest.output.activation"),
        (lambda d: d["input"].update(height=100000), "manifest.input.height"),
        (lambda d: d["input"]["normalize"].update(std=0), "manifest.input.normalize.std"),
        (lambda d: d["input"].update(modalities=[]), "manifest.input.modalities"),
        (lambda d: d.update(schema_version=9), "schema_version"),
        (lambda d: d.update(version=True), "manifest.version: expected int"),
    ],
)
def test_invalid_manifest_names_the_field(mutate: Any, message: str) -> None:
    data = _dict()
    mutate(data)
    with pytest.raises(ManifestError, match=message.replace(".", r"\.")):
        Manifest.from_dict(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        Manifest.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["output"].update(thresholds=["x"]), "numbers only"),
        (lambda d: d["output"].update(thresholds=[None]), "numbers only"),
        (lambda d: d.update(version=0), "must be >= 1"),
    ],
)
def test_bad_values_are_manifest_errors(mutate: Any, message: str) -> None:
    data = _dict()
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


def test_manufacturer_is_optional_round_trips_and_is_checked(tmp_path: Path) -> None:
    """Older manifests have no manufacturer (empty: the gateway's stands in for results);
    one that names it keeps it; a value DICOM's LO cannot carry is refused."""
    assert Manifest.from_dict(_dict()).manufacturer == ""
    assert "manufacturer" not in TINY_MANIFEST.to_dict()  # older manifests stay byte-equal
    data = _dict() | {"manufacturer": "Acme Models"}
    named = Manifest.from_dict(data)
    assert named.manufacturer == "Acme Models"
    named.save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json") == named
    for bad in ("x" * 65, " Acme", "Ac\\me", "Acme\n"):
        with pytest.raises(ManifestError, match=r"manifest\.manufacturer"):
            Manifest.from_dict(_dict() | {"manufacturer": bad})
    with pytest.raises(ManifestError, match=r"manifest\.manufacturer: expected str"):
        Manifest.from_dict(_dict() | {"manufacturer": 7})
