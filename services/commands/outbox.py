"""``bedside outbox``: the gateway's results-delivery outbox (services/gateway/outbox_cli.py
owns the flags)."""

from __future__ import annotations

import argparse

from services.gateway import outbox_cli

NAME = "outbox"
HELP = ("results delivery: list the gateway's outbox, requeue dead-letter rows "
        "(`bedside outbox --spool DIR list`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    outbox_cli.add_subcommands(parser)


def run(args: argparse.Namespace) -> int:
    return outbox_cli.run(args)
