"""Bounded JSON parsing for every JSON body the gateway reads from a peer (the REST study API,
OIP REST inference headers, a STOW-RS destination's answer).

``json.loads`` nests by recursion: a body of 100,000 ``[`` ends in ``RecursionError`` (a 500,
and time spent). ``parse_json`` refuses a body over ``max_bytes`` before parsing, turns a
recursion overflow into ``BadRequest``, and refuses any document nested deeper than
``MAX_JSON_DEPTH`` (no request of the gateway's own APIs nests more than five levels).

A leaf: it imports only ``errors``.
"""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import BadRequest, PayloadTooLarge

MAX_JSON_DEPTH = 32


def depth(doc: Any) -> int:
    """How deep arrays and objects nest in ``doc`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        children = (node.values() if isinstance(node, dict)
                    else node if isinstance(node, list) else None)
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


def parse_json(body: bytes | str, what: str, max_bytes: int,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``body`` parsed, or ``BadRequest`` (reasons ``bad_json``, ``json_too_deep``) or
    ``PayloadTooLarge`` (``json_too_large``) with a message that names ``what`` was read."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"{what} of {len(body)} bytes exceeds {max_bytes}",
                              "json_too_large")
    try:
        doc = json.loads(body)
    except RecursionError as exc:
        raise BadRequest(f"{what} is nested deeper than {max_depth} levels",
                         "json_too_deep") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not JSON: {exc}", "bad_json") from exc
    if depth(doc) > max_depth:
        raise BadRequest(f"{what} is nested deeper than {max_depth} levels", "json_too_deep")
    return doc
