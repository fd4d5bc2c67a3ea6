"""Model loading: three formats a research team hands over.

- a Bedside checkpoint (``.pt``): an architecture from MONAI's network zoo, its arguments and
  weights, loaded with ``weights_only=True`` so that it cannot run code; the architecture is
  looked up among MONAI's networks, never imported from an arbitrary dotted path;
- TorchScript (``torch.jit.save``), recognised by its archive layout;
- an exported program (``torch.export.save``, ``.pt2``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import monai.networks.nets as monai_nets
import torch
from torch import nn

from optimizer.errors import CheckpointError

FORMAT = "bedside-checkpoint/1"
# MONAI's optional imports say "(No module named 'einops')"; Python's ModuleNotFoundError
# carries the name itself.
_NO_MODULE = re.compile(r"No module named '([A-Za-z0-9_.]+)'")
# The extra that installs what MONAI's networks import optionally (pyproject.toml).
MONAI_EXTRA = "bedside[monai-nets]"


def missing_package(exc: BaseException) -> str | None:
    """The top-level package an import error is about, or None."""
    name = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if not name and (m := _NO_MODULE.search(str(exc))):
        name = m.group(1)
    return name.split(".")[0] if name else None


def needs_package(what: str, exc: ImportError) -> CheckpointError:
    """The error for a model whose code imports a package that is not installed."""
    package = missing_package(exc)
    if package is None:
        return CheckpointError(f"{what} failed to import a dependency: {exc}")
    return CheckpointError(
        f"{what} needs the Python package '{package}', which is not installed here: "
        f"pip install {package} (for MONAI's networks: pip install '{MONAI_EXTRA}')")


def build(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate ``monai.networks.nets.<architecture>(**kwargs)``."""
    cls = getattr(monai_nets, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{architecture!r} is not a network in monai.networks.nets")
    try:
        return cls(**kwargs)
    except ImportError as exc:  # MONAI's OptionalImportError is one
        raise needs_package(f"monai.networks.nets.{architecture}", exc) from exc
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"cannot build {architecture}: {exc}") from exc


def save(path: Path, architecture: str, kwargs: dict[str, Any], model: nn.Module) -> None:
    torch.save(
        {"format": FORMAT, "architecture": architecture, "kwargs": kwargs,
         "state_dict": model.state_dict()},
        path,
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def format_of(path: Path) -> str:
    """``torchscript``, ``exported-program`` or ``bedside-checkpoint``: the form the model
    came in, which names what the PyTorch baseline runs."""
    if path.suffix == ".pt2":
        return "exported-program"
    return "torchscript" if path.is_file() and _is_torchscript(path) else "bedside-checkpoint"


def load(path: Path) -> nn.Module:
    """The model in eval mode without gradients, or a CheckpointError saying what is wrong."""
    model = _load(path)
    for param in model.parameters():  # inference only; lets TorchScript run in inference_mode
        param.requires_grad_(False)
    return model


def _load(path: Path) -> nn.Module:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:
            raise CheckpointError(f"{path} is not a loadable exported program: {exc}") from exc
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"{path} is not a loadable TorchScript model: {exc}") from exc
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}") from exc
    except Exception as exc:  # torch raises pickle/zip/runtime errors alike
        raise CheckpointError(f"{path} is not a loadable checkpoint: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    missing = {"architecture", "kwargs", "state_dict"} - set(blob)
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(sorted(missing))}")
    model = build(str(blob["architecture"]), dict(blob["kwargs"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {exc}") from exc
    return model.eval()
