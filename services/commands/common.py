"""What several subcommands share."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_triton_env() -> Path:
    """$BEDSIDE_TRITON_ENV, else .venv-triton beside this environment (scripts/dev.sh's layout:
    .venv and .venv-triton side by side in the checkout), wherever the command runs from."""
    if "BEDSIDE_TRITON_ENV" in os.environ:
        return Path(os.environ["BEDSIDE_TRITON_ENV"]).absolute()
    return Path(sys.prefix).parent / ".venv-triton"


TRITON_ENV_HELP = ("Triton's Python environment (default $BEDSIDE_TRITON_ENV, else "
                   ".venv-triton beside Bedside's own environment)")
