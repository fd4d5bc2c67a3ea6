"""Models as users have them return a tensor, or a tuple, list or dict of them (a ViT returns
its logits and hidden states; a deep-supervision UNet several maps). The manifest's
``output.prediction`` names the one that is the prediction (an index or a key); ``prediction``
wraps the model so that only that output is verified, exported and served, and without it a
model with several outputs is refused with a list of them and their shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from optimizer.checkpoint import needs_package
from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest
from optimizer.errors import CheckpointError


def describe(out: Any, depth: int = 0) -> str:
    """``tensor (2, 10) float32``, or the same for every item of a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')}"
    if depth > 1:
        return type(out).__name__
    if isinstance(out, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in out.items()) + "}"
    if isinstance(out, Sequence) and not isinstance(out, str):
        return "[" + ", ".join(f"[{i}] {describe(v, depth + 1)}" for i, v in enumerate(out)) + "]"
    return type(out).__name__


def pick(out: Any, key: int | str) -> torch.Tensor:
    """The prediction among a model's outputs; ManifestError when ``key`` does not name a
    tensor among them."""
    try:
        chosen = out[key]
    except (IndexError, KeyError, TypeError) as exc:
        raise ManifestError(f"manifest.output.prediction {key!r} is not among the model's "
                            f"outputs: {describe(out)}") from exc
    if not isinstance(chosen, torch.Tensor):
        raise ManifestError(f"manifest.output.prediction {key!r} names a "
                            f"{type(chosen).__name__}, not a tensor: {describe(out)}")
    return chosen


class Prediction(nn.Module):
    """The model with only its prediction output (``pick``)."""

    def __init__(self, model: nn.Module, key: int | str) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pick(self.model(x), self.key)

    def train(self, mode: bool = True) -> Prediction:
        # the wrapped model was loaded in eval mode; an exported program's module has no train()
        self.training = mode
        return self


def prediction(model: nn.Module, manifest: Manifest) -> nn.Module:
    """``model`` itself when it returns one tensor, else the model with only the output the
    manifest names; ManifestError listing the outputs and their shapes when it names none."""
    sample = torch.zeros((2, *manifest.input.shape), dtype=torch.float32)
    try:
        with torch.inference_mode():
            out = model(sample)
    except ImportError as exc:  # model code importing an optional package as it runs
        raise needs_package("the model", exc) from exc
    except Exception as exc:  # the model's own errors, whatever their type
        raise CheckpointError(f"the model fails on inputs of shape {manifest.input.shape}: "
                              f"{exc}") from exc
    key = manifest.output.prediction
    if isinstance(out, torch.Tensor):
        if key is not None:
            raise ManifestError(f"manifest.output.prediction is {key!r} but the model returns "
                                f"one tensor ({describe(out)}): remove it")
        return model
    kind = type(out).__name__
    if key is None:
        raise ManifestError(
            f"the model returns a {kind} of {len(out)} outputs, not one tensor: {describe(out)}."
            " Set manifest.output.prediction to the index (or key) of the prediction; only "
            "that output is exported and served")
    pick(out, key)  # names the problem now, not in the exporter
    wrapped = Prediction(model, key)
    if isinstance(model, torch.jit.ScriptModule):  # TorchScript exports as TorchScript
        with torch.no_grad():
            traced: nn.Module = torch.jit.trace(wrapped, sample, check_trace=False)
        return traced
    return wrapped
