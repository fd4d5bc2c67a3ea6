"""What ``bedside optimize`` is asked to do: ``OptimizeRequest``, each field declared once.

A field that the command line sets is declared with ``option(...)``: its default (the field's),
its flag and help. The command's flags (``add_arguments``), the request built from them
(``from_args``) and the command line that reproduces a request (``OptimizeRequest.command()``)
are all generated from these declarations, so that ``from_args(parse(request.command()))``
equals the request (tests/optimizer/test_request.py). A new flag is one more field here.

How a value is written on the command line follows the field's type: a path, number or string
as itself; ``tuple[str, ...]`` comma-separated (``none`` when empty); ``dict[str, float]`` as a
repeated ``KEY=VALUE`` flag; ``bool`` as a flag that turns the default off.

Torch-free (the ``bedside`` command builds its parser from it, also in the gateway's image).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from optimizer.ov_options import HINTS, OV_PRECISIONS

OBJECTIVES = ("latency", "throughput", "throughput-within-slo")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TARGETS = ("cpu", "gpu", "gpu-torch")
# The keys of optimizer.quantize.METHODS (ONNX Runtime's calibration methods), in trial order.
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# What each target builds when --precisions is not given.
DEFAULT_PRECISIONS = {"cpu": ("fp32", "fp16", "int8"), "gpu": ("fp32", "fp16", "int8"),
                      "gpu-torch": ("fp32", "fp16", "bf16")}
# The OpenVINO variants each target builds when --openvino is not given (CPU nodes only). A
# library caller gets none unless it asks (OptimizeRequest's own default).
DEFAULT_OPENVINO: dict[str, tuple[str, ...]] = {"cpu": OV_PRECISIONS, "gpu": (),
                                                "gpu-torch": ()}
OPTION: Final = "option"  # the key of a field's declaration in its dataclass metadata
NONE: Final = "none"  # an empty tuple on the command line


@dataclass(frozen=True)
class BenchOptions:
    """How variants are benchmarked (library and tests; the command uses these defaults)."""

    warmup: int = 10
    min_runs: int = 50
    min_seconds: float = 1.0
    max_batch: int = 32
    min_gain: float = 0.05  # stop doubling the batch when throughput gains less than this
    max_seconds: float = 8.0  # one point stops here once it has floor_runs calls
    floor_runs: int = 10
    # The runtimes take turns in this many slices per batch size (optimizer.benchmark.measure).
    rounds: int = 3
    # A batch-1 figure is unstable when its slices' p50s lie further apart than this share of
    # their median, or its p95 exceeds this many times its p50; the window is unstable when the
    # 1-minute load average exceeds this many runnable tasks per CPU (other work competed).
    max_spread: float = 0.25
    max_tail: float = 3.0
    max_load_per_cpu: float = 1.0
    remeasure: int = 1  # extra batch-1 windows when a figure is unstable

    def __post_init__(self) -> None:
        if self.max_seconds < self.min_seconds or self.floor_runs < 1:
            raise ValueError("max_seconds must be >= min_seconds and floor_runs >= 1")
        if self.rounds < 1 or self.remeasure < 0:
            raise ValueError("rounds must be >= 1 and remeasure >= 0")


@dataclass(frozen=True)
class Option:
    """The command-line side of one ``OptimizeRequest`` field."""

    flag: str
    help: str = ""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    # (field, table): the default is table[value of that field], e.g. precisions per target.
    default_by: tuple[str, Mapping[str, Any]] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def option(default: Any = dataclasses.MISSING, *, flag: str, help: str = "",
           choices: tuple[str, ...] | None = None, metavar: str | None = None,
           default_by: tuple[str, Mapping[str, Any]] | None = None) -> Any:
    """An ``OptimizeRequest`` field with its flag (no default: a required flag)."""
    spec = Option(flag, help, choices, metavar, default_by)
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={OPTION: spec})
    return field(default=default, metadata={OPTION: spec})


@dataclass(frozen=True)
class OptimizeRequest:
    checkpoint: Path = option(flag="--checkpoint")
    manifest: Path = option(flag="--manifest")
    calibration_dir: Path = option(flag="--calibration",
                                   help="folder of DICOM files with labels.csv")
    validation_dir: Path = option(flag="--validation",
                                  help="folder of labelled DICOM files with labels.csv")
    out_dir: Path = option(flag="--out")
    threads: int = option(2, flag="--threads")
    precisions: tuple[str, ...] = option(
        DEFAULT_PRECISIONS["cpu"], flag="--precisions", default_by=("target", DEFAULT_PRECISIONS),
        help="comma-separated, from fp32, fp16, bf16, int8 (fp32 is always built; default: "
             "fp32,fp16,int8 for cpu and gpu, fp32,fp16,bf16 for gpu-torch)")
    calibration_methods: tuple[str, ...] = option(
        CALIBRATION_METHODS, flag="--calibration-methods",
        help="INT8 calibration methods to try; the validation set picks one")
    objective: str = option("latency", flag="--objective", choices=OBJECTIVES)
    target: str = option(
        "cpu", flag="--target", choices=TARGETS,
        help="cpu: python backend + ONNX Runtime; gpu: onnxruntime + TensorRT; gpu-torch: "
             "python backend + PyTorch on a CUDA GPU (needs one here)")
    calibration_limit: int = option(64, flag="--calibration-limit",
                                    help="calibration inputs used at most")
    recovery_max_fraction: float = option(
        0.5, flag="--recovery-max-fraction",
        help="share of the graph INT8 recovery may keep in FP32")
    # "fp16": the FP16 variant also takes and returns FP16 tensors
    fp16_io: str = option("fp32", flag="--fp16-io", choices=("fp32", "fp16"),
                          help="I/O of the FP16 variant (fp32 keeps callers unchanged)")
    recovery: bool = option(True, flag="--no-recovery",
                            help="do not keep sensitive nodes in FP32 when INT8 misses the budget")
    # Per-precision absolute MAE ceilings replacing the scale-aware ladder (optimizer.verify),
    # e.g. {"int8": 0.1}.
    mae_tolerances: dict[str, float] = option(
        {}, flag="--mae-tolerance", metavar="PRECISION=MAE",
        help="an absolute MAE ceiling instead of the scale-aware rung, e.g. int8=0.1 "
             "(repeatable)")
    # OpenVINO variants (optimizer.ov_variants), CPU target only; threads: ``threads``.
    openvino: tuple[str, ...] = option(
        (), flag="--openvino", default_by=("target", DEFAULT_OPENVINO),
        help="OpenVINO variants, from fp32, bf16, int8, or none (default: all three for cpu, "
             "none for the GPU targets); bf16 only where the CPU has native BF16")
    ov_streams: int = option(1, flag="--ov-streams",
                             help="OpenVINO CPU streams (1 for latency; more for throughput)")
    ov_hint: str = option("latency", flag="--ov-hint", choices=HINTS,
                          help="OpenVINO performance hint")
    bench_budget_s: float = option(
        240.0, flag="--bench-budget",
        help="seconds for the whole benchmark step, all runtimes in turn (inf: unbounded)")
    # A state dict (--checkpoint) with the code that builds the network: "module:function" or
    # "path/to/file.py:function", a function without arguments returning the nn.Module. Empty:
    # the checkpoint is a Bedside checkpoint, TorchScript or an exported program.
    builder: str = option(
        "", flag="--builder", metavar="MODULE:FUNCTION",
        help="with --checkpoint STATE_DICT.pt: the function building the network, as "
             "package.module:function or path/to/file.py:function (called without arguments)")
    # Not on the command line: the command benchmarks with the defaults; tests pass quick ones.
    bench: BenchOptions = field(default_factory=BenchOptions)

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or "fp32" not in self.precisions:
            raise ValueError(f"precisions must include fp32 and come from {PRECISIONS}")
        if not self.calibration_methods or any(m not in CALIBRATION_METHODS
                                               for m in self.calibration_methods):
            raise ValueError(f"calibration methods come from {sorted(CALIBRATION_METHODS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}")
        if set(self.mae_tolerances) - set(PRECISIONS):
            raise ValueError(f"MAE tolerances are for {PRECISIONS}, not "
                             f"{sorted(set(self.mae_tolerances) - set(PRECISIONS))}")
        if self.threads < 1 or self.calibration_limit < 1:
            raise ValueError("threads and calibration_limit must be >= 1")
        if not 0.0 < self.recovery_max_fraction <= 1.0:
            raise ValueError("recovery_max_fraction must lie in (0, 1]")
        if self.fp16_io not in ("fp32", "fp16"):
            raise ValueError("fp16_io must be fp32 or fp16")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        if set(self.openvino) - set(OV_PRECISIONS):
            raise ValueError(f"OpenVINO precisions come from {OV_PRECISIONS}")
        if self.ov_streams < 1 or self.ov_hint not in HINTS:
            raise ValueError(f"OpenVINO streams must be >= 1 and the hint one of {HINTS}")
        if not self.bench_budget_s > 0:
            raise ValueError("the benchmark budget must be > 0 seconds (inf: unbounded)")
        if self.builder and (":" not in self.builder or not all(self.builder.rsplit(":", 1))):
            raise ValueError("--builder takes module:function or path/to/file.py:function")
        if self.target == "gpu-torch" and "int8" in self.precisions:
            raise ValueError("target gpu-torch builds fp32, fp16 and bf16 (INT8 on a GPU needs "
                             "TensorRT: use --target gpu)")

    def command(self) -> list[str]:
        """The ``bedside optimize`` command line that reproduces this request (paths absolute,
        every option written out, so that it does not depend on today's defaults)."""
        argv = ["bedside", "optimize"]
        for name, spec, kind in _options():
            value = getattr(self, name)
            if kind is bool:
                argv += [spec.flag] if value != _default(name) else []
            elif kind is dict:
                argv += [a for k, v in sorted(value.items()) for a in (spec.flag, f"{k}={v}")]
            elif kind is tuple:
                argv += [spec.flag, ",".join(value) or NONE]
            elif kind is Path:
                argv += [spec.flag, str(value.absolute())]
            else:
                argv += [spec.flag, str(value)]
        return argv


def _options() -> list[tuple[str, Option, type]]:
    """(field, declaration, kind) of every field the command line sets, in declaration order;
    kind is the field's type or, for generics, its origin (tuple, dict)."""
    hints = typing.get_type_hints(OptimizeRequest)
    return [(f.name, f.metadata[OPTION], typing.get_origin(hints[f.name]) or hints[f.name])
            for f in dataclasses.fields(OptimizeRequest) if OPTION in f.metadata]


def _default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(OptimizeRequest) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _required(name: str) -> bool:
    f = next(f for f in dataclasses.fields(OptimizeRequest) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _command_default(name: str, spec: Option, kind: type) -> Any:
    """The flag's default as argparse holds it: text for tuples, None where another option
    decides it (``default_by``) or the flag is required."""
    default = _default(name)
    if spec.default_by is not None or default is None:
        return None
    if kind is tuple:
        return ",".join(default) or NONE
    if kind is dict:
        return []
    return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``bedside optimize``."""
    for name, spec, kind in _options():
        default = _command_default(name, spec, kind)
        if kind is bool:
            parser.add_argument(spec.flag, action="store_true", help=spec.help or None)
        elif kind is dict:
            parser.add_argument(spec.flag, action="append", default=[], metavar=spec.metavar,
                                help=spec.help or None)
        else:
            required = _required(name)
            convert: Any = kind if kind in (Path, int, float) else None  # str, tuple: text
            parser.add_argument(spec.flag, type=convert, required=required,
                                default=None if required else default, choices=spec.choices,
                                metavar=spec.metavar, help=spec.help or None)


def from_args(args: argparse.Namespace) -> OptimizeRequest:
    """The request a parsed ``bedside optimize`` command line asks for; ValueError when a
    value is malformed or the request is invalid."""
    values: dict[str, Any] = {}
    later: list[tuple[str, Option]] = []
    for name, spec, kind in _options():
        raw = getattr(args, spec.dest)
        if kind is bool:
            values[name] = not _default(name) if raw else _default(name)
        elif kind is dict:
            pairs = [item.split("=", 1) for item in raw]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"{spec.flag} takes KEY=VALUE, got {raw}")
            values[name] = {k: float(v) for k, v in pairs}
        elif raw is None and spec.default_by is not None:
            later.append((name, spec))
        elif kind is tuple:
            values[name] = () if raw == NONE else tuple(raw.split(","))
        else:
            values[name] = raw
    for name, spec in later:
        assert spec.default_by is not None
        source, table = spec.default_by
        values[name] = table[values[source]]
    return OptimizeRequest(**values)


__all__ = ["CALIBRATION_METHODS", "DEFAULT_OPENVINO", "DEFAULT_PRECISIONS", "OBJECTIVES",
           "PRECISIONS", "TARGETS", "BenchOptions", "OptimizeRequest", "add_arguments", "from_args"]
