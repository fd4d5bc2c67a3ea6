"""``bedside reference``: a reference model (random weights), its manifest and synthetic
calibration/validation data, ready for ``bedside optimize``."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "reference"
HELP = ("write a reference model (random weights), its manifest and synthetic "
        "calibration/validation data, for optimize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=["densenet121", "unet2d", "unet3d"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--side", type=int, default=None, help="input side (smaller = faster)")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--validation", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from optimizer.reference import write_reference

    write_reference(args.model, args.out, args.side, args.calibration, args.validation)
    o = args.out
    print(f"wrote {args.model} to {o}; next:\n  bedside optimize --checkpoint "
          f"{o}/model.pt --manifest {o}/manifest.json --calibration {o}/calibration "
          f"--validation {o}/validation --out {o}/optimized")
    return 0
