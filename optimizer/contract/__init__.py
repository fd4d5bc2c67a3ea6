"""The model contract: what a model promises and how a DICOM instance or series becomes its
input and its output becomes findings. Shared, in one copy, by the optimizer (which calibrates
and verifies on it) and the gateway (which serves by it), so both see the same numbers.

Owns:
- ``manifest``: the model manifest (validated once into frozen dataclasses);
- ``preprocess``: header checks, decoding, modality LUT, VOI, resize, normalisation, and the
  stacking of planes into a volume;
- ``series``: slice order, the manifest's series selection rules, a series as a 3-D input;
- ``findings``: activation of raw outputs and findings at the manifest's thresholds;
- ``errors``: the root ``BedsideError`` and the contract's ``ManifestError``/``PreprocessError``.

May import: the standard library, numpy and pydicom (the project's core dependencies), and
itself. Never torch, ONNX, ONNX Runtime or MONAI, nothing else of ``optimizer`` and nothing of
``services`` (``tests/optimizer/contract/test_boundary.py`` checks it).

Imported by: every ``optimizer`` step, and from ``optimizer`` the gateway, the CLI and
``bedside deploy`` import only this package.

Why it lives under ``optimizer/``: the optimizer writes the manifest into the model repository
and produces models for it; the gateway consumes it. ``services`` already depends on
``optimizer`` (the CLI and the demo run the optimizer) and ``optimizer`` never imports
``services``, so a contract under ``optimizer/`` keeps that one direction; under ``services/``
the optimizer would have to import from the services package. ``optimizer/__init__.py`` imports
nothing, so ``import optimizer.contract`` loads no torch: the gateway image installs the whole
project with the core dependencies only (``requirements/gateway.lock``, no torch) and imports
the contract alone.
"""
