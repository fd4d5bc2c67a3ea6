"""``bedside models``: a running gateway's models and their versions.

    bedside models status                      every model: primary, shadow, canary, agreement
    bedside models promote NAME [--version N]  N (default: the canary, else the shadow) answers
    bedside models rollback NAME               back to the primary before the last promotion

It calls the gateway's ``/v1/models`` API (``--url``, default http://127.0.0.1:8080); the key
is read from ``--api-key-file`` or ``BEDSIDE_API_KEY`` (promote and rollback need the
``models`` scope). Changes take effect without a restart and are in the gateway's audit trail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

NAME = "models"
HELP = "a running gateway's models: status, promote or roll back a version"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080",
                        help="the gateway's HTTP address (default %(default)s)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="file holding the API key (default: $BEDSIDE_API_KEY, or none)")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="CA bundle to verify the gateway's TLS certificate")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="every model: versions, canary share, agreement so far")
    promote = sub.add_parser("promote", help="make a version the primary (no restart)")
    promote.add_argument("name")
    promote.add_argument("--version", type=int, default=None,
                         help="the version to promote (default: the canary, else the shadow)")
    rollback = sub.add_parser("rollback", help="back to the primary before the last promotion")
    rollback.add_argument("name")


def _headers(args: argparse.Namespace) -> dict[str, str]:
    key = (args.api_key_file.read_text(encoding="utf-8").strip() if args.api_key_file
           else os.environ.get("BEDSIDE_API_KEY", ""))
    return {"Authorization": f"Bearer {key}"} if key else {}


def _print_status(models: list[dict[str, Any]]) -> None:
    for m in models:
        parts = [f"primary {m['primary']}"]
        if m.get("shadow") is not None:
            parts.append(f"shadow {m['shadow']}")
        if m.get("canary") is not None:
            parts.append(f"canary {m['canary']} ({m['share']:.0%} of studies)")
        if m.get("previous") is not None:
            parts.append(f"rollback to {m['previous']}")
        print(f"{m['name']} ({m['task']}): {', '.join(parts)}")
        budget = m["accuracy_budget"]
        for pair in m.get("agreement", []):
            for label, s in pair["labels"].items():
                if "agreement" in s:
                    ok = s["agreement"] >= budget["min_agreement"]
                    detail = (f"agreement {s['agreement']:.3f} (budget >= "
                              f"{budget['min_agreement']}), mean score error "
                              f"{s['mean_score_error']:.4f}")
                else:
                    ok = s["mean_dice"] >= 1.0 - budget["max_dice_drop"]
                    detail = (f"mean Dice {s['mean_dice']:.3f} (budget >= "
                              f"{1.0 - budget['max_dice_drop']:.3f})")
                print(f"  v{pair['candidate']} vs v{pair['baseline']} {label}: {detail} over "
                      f"{s['comparisons']} inputs{'' if ok else '  BELOW BUDGET'}")
        if m.get("shadow_failures"):
            print(f"  shadow failures: {m['shadow_failures']}")


def run(args: argparse.Namespace) -> int:
    verify: Any = str(args.ca) if args.ca else True
    url = args.url.rstrip("/")
    try:
        with httpx.Client(headers=_headers(args), verify=verify, timeout=120.0) as client:
            if args.action == "status":
                r = client.get(f"{url}/v1/models")
            else:
                body = ({"version": args.version}
                        if args.action == "promote" and args.version is not None else None)
                r = client.post(f"{url}/v1/models/{args.name}/{args.action}", json=body)
    except httpx.HTTPError as exc:
        print(f"bedside models: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 2
    doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code >= 400:
        error = doc.get("error", {}) if isinstance(doc, dict) else {}
        print(f"bedside models {args.action}: {r.status_code} "
              f"{error.get('reason', '')}: {error.get('message', r.text[:300])}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.action == "status":
        _print_status(doc["models"])
    else:
        print(f"{doc['name']}: {args.action} done; primary version {doc['primary']}"
              + (f" (rollback to {doc['previous']})" if doc.get("previous") else ""))
    return 0
