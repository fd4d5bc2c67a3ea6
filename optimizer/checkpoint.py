"""Model loading: the forms a research team hands over.

- a Bedside checkpoint (``.pt``): an architecture from MONAI's network zoo, its arguments and
  weights, loaded with ``weights_only=True`` so that it cannot run code; the architecture is
  looked up among MONAI's networks, never imported from an arbitrary dotted path;
- TorchScript (``torch.jit.save``), recognised by its archive layout;
- an exported program (``torch.export.save``, ``.pt2``);
- a state dict (``torch.save(model.state_dict())``, also inside ``{"state_dict": ...}``, and
  with DataParallel's ``module.`` prefix) with the code that builds the network: a builder,
  ``package.module:function`` or ``path/to/file.py:function``, called without arguments. The
  weights are loaded with ``weights_only=True``; the only code run is the builder the user
  named, as their own training code would be.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import zipfile
from collections.abc import Mapping
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


def format_of(path: Path, builder: str | None = None) -> str:
    """``state-dict``, ``torchscript``, ``exported-program`` or ``bedside-checkpoint``: the
    form the model came in, which names what the PyTorch baseline runs."""
    if builder:
        return "state-dict"
    if path.suffix == ".pt2":
        return "exported-program"
    return "torchscript" if path.is_file() and _is_torchscript(path) else "bedside-checkpoint"


def load(path: Path, builder: str | None = None) -> nn.Module:
    """The model in eval mode without gradients, or a CheckpointError saying what is wrong;
    with ``builder``, ``path`` is a state dict for the network it builds."""
    model = _from_builder(path, builder) if builder else _load(path)
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
        if _state_dict(blob) is not None:
            raise CheckpointError(
                f"{path} holds a state dict (weights without the network): give the code that "
                "builds the network with --builder package.module:function or "
                "--builder path/to/file.py:function")
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint, TorchScript or an exported "
                              "program (.pt2)")
    missing = {"architecture", "kwargs", "state_dict"} - set(blob)
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(sorted(missing))}")
    model = build(str(blob["architecture"]), dict(blob["kwargs"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {exc}") from exc
    return model.eval()


def _state_dict(blob: object) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict, bare or under "state_dict" (Lightning and most training
    scripts), without DataParallel's "module." prefix; None when ``blob`` is none of these."""
    if isinstance(blob, Mapping) and isinstance(blob.get("state_dict"), Mapping):
        blob = blob["state_dict"]
    if not isinstance(blob, Mapping) or not blob or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        return None
    if all(k.startswith("module.") for k in blob):
        return {k.removeprefix("module."): v for k, v in blob.items()}
    return dict(blob)


def builder_function(spec: str) -> object:
    """The function ``package.module:function`` or ``path/to/file.py:function`` names."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise CheckpointError(f"builder file not found: {file}")
            module_spec = importlib.util.spec_from_file_location(f"bedside_builder_{file.stem}",
                                                                 file)
            if module_spec is None or module_spec.loader is None:
                raise CheckpointError(f"cannot import the builder file {file}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        if missing_package(exc) == where.split(".")[0]:
            raise CheckpointError(f"builder module {where!r} not found (a module on the "
                                  "Python path, or a .py file)") from exc
        raise needs_package(f"the builder {spec}", exc) from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise CheckpointError(f"the builder {spec}: {where} has no function {name!r}")
    return function


def _from_builder(path: Path, builder: str) -> nn.Module:
    function = builder_function(builder)
    try:
        model = function()  # type: ignore[operator]
    except ImportError as exc:
        raise needs_package(f"the builder {builder}", exc) from exc
    except Exception as exc:  # the user's code, whatever it raises
        raise CheckpointError(f"the builder {builder} failed: {type(exc).__name__}: "
                              f"{exc}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"the builder {builder} returned a {type(model).__name__}, not "
                              "a torch.nn.Module")
    if not path.is_file():
        raise CheckpointError(f"state dict not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/zip/runtime errors alike
        raise CheckpointError(f"{path} is not a loadable state dict: {exc}") from exc
    weights = _state_dict(blob)
    if weights is None:
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the network {builder} "
                              f"builds: {exc}") from exc
    return model.eval()
