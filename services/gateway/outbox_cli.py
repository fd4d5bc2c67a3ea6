"""`bedside outbox`: look at what the gateway has to deliver and requeue dead-letter rows
once a destination is fixed (delivery/outbox.py). Prints ids, names, states, attempts and reasons:
no patient data. Safe while the gateway runs (SQLite WAL); its senders pick requeued rows up
at their next poll."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool", type=Path, required=True, help="the gateway's spool folder")
    sub = parser.add_subparsers(dest="outbox_command", required=True)
    show = sub.add_parser("list", help="outbox rows: id, destination, route, state, attempts, "
                          "reason (no patient data)")
    show.add_argument("--state", choices=("pending", "delivered", "dead"), default=None)
    again = sub.add_parser("requeue", help="dead-letter rows back to pending")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--destination", help="every dead row of this destination")
    which.add_argument("--id", type=int, action="append", dest="ids", help="a row id")


def run(args: argparse.Namespace) -> int:
    from services.gateway.delivery.outbox import Outbox  # heavy imports only when run

    path = args.spool / Outbox.FILE
    if not path.is_file():
        print(f"bedside: error: no outbox at {path}", file=sys.stderr)
        return 2
    outbox = Outbox(args.spool)
    try:
        if args.outbox_command == "requeue":
            n = outbox.requeue(args.destination, tuple(args.ids or ()))
            print(f"requeued {n} row(s)")
            return 0
        now = time.time()
        print("id\tdestination\troute\tstate\tattempts\tage_s\treason\tmessage")
        for row in outbox.rows():
            if args.state is None or row.state == args.state:
                print(f"{row.id}\t{row.destination}\t{row.route}\t{row.state}\t"
                      f"{row.attempts}\t{now - row.created_at:.0f}\t{row.reason or ''}\t"
                      f"{row.message or ''}")
        return 0
    finally:
        outbox.close()
