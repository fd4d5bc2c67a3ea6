"""The image storage SOP classes the gateway takes in, derived from the standard, not listed.

A storage SOP class is an *image* class when its IOD carries pixels: the Image Pixel module
(which holds Pixel Data, 7FE0,0010) is mandatory in it (PS3.3 Annex A). The storage classes come
from pynetdicom's registry (the ones it can negotiate), the IOD of each and the IOD's modules
from the PS3.3 tables that highdicom ships (``highdicom/_standard/*.json``, package data
highdicom itself reads to tell which modules an IOD has; a private path, so the tests fail
loudly if a highdicom upgrade moves it), the names from pydicom's UID dictionary. A new image
storage class in a newer standard arrives with those packages; nothing is listed here by hand.

Left out, and refused per instance with 0x0122 as before: every storage class whose IOD has no
mandatory Image Pixel module (SR, Key Object Selection, presentation states, waveforms,
encapsulated documents, RT plans and structure sets, RT Dose and Parametric Map, whose Image
Pixel module is conditional: a dose grid or float pixels are no model input).

What the model takes among the image classes is the manifest's business (its modalities,
photometric interpretations, bit depths: ``optimizer.contract.preprocess.check_image_header``),
answered with its own status and reason (``NotForModel``), not here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

PIXEL_MODULE = "image-pixel"  # PS3.3 C.7.6.3, the module that holds Pixel Data
MANDATORY = "M"


def _standard_table(name: str) -> Any:
    """One of highdicom's PS3.3 tables (package data, read once per process)."""
    text = resources.files("highdicom").joinpath("_standard", name).read_text(encoding="utf-8")
    return json.loads(text)


def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class pynetdicom can negotiate, in its order."""
    return tuple(str(context.abstract_syntax) for context in AllStoragePresentationContexts)


def class_name(sop_class: str) -> str:
    """A SOP class's name from pydicom's UID dictionary (the UID itself where it has none)."""
    uid = UID(sop_class)
    return uid.name if uid.name != sop_class else sop_class


@functools.cache
def image_sop_classes() -> Mapping[str, str]:
    """SOP Class UID -> name, for every storage class whose IOD has a mandatory Image Pixel
    module, in pynetdicom's order."""
    iods: dict[str, str] = _standard_table("sop_class_iod_map.json")
    modules: dict[str, list[dict[str, str]]] = _standard_table("iod_module_map.json")
    found: dict[str, str] = {}
    for sop_class in storage_sop_classes():
        iod = iods.get(sop_class)
        if iod is None:  # a class newer than highdicom's tables: not known to carry pixels
            continue
        if any(m["key"] == PIXEL_MODULE and m["usage"] == MANDATORY for m in modules[iod]):
            found[sop_class] = class_name(sop_class)
    if not found:
        raise RuntimeError("no image storage SOP class found in the PS3.3 tables")
    return MappingProxyType(found)
