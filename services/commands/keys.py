"""``bedside keys``: gateway API keys (services/gateway/security/auth.py owns the flags)."""

from __future__ import annotations

import argparse

from services.gateway.security import auth

NAME = "keys"
HELP = ("gateway API keys: `bedside keys new --name X --scopes infer,read` prints a key once "
        "with its keys-file entry")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    auth.add_subcommands(parser)


def run(args: argparse.Namespace) -> int:
    return auth.run(args)
