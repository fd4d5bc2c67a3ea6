"""``bedside conformance``: what the gateway accepts (transfer syntaxes with their decoders,
image storage SOP classes), printed as the README's markdown section, read from the code."""

from __future__ import annotations

import argparse

NAME = "conformance"
HELP = ("print the transfer syntaxes and image storage SOP classes the gateway accepts "
        "(markdown, the README's section)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from services.gateway.dicom import conformance

    print(conformance.markdown(), end="")
    return 0
