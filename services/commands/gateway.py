"""``bedside gateway``: the gateway against a running Triton. Its flags are generated from the
settings declared in ``services/gateway/config.py``; ``bedside serve`` shares them."""

from __future__ import annotations

import argparse
import logging
import threading
from typing import TYPE_CHECKING

from services.errors import ConfigError
from services.gateway.config import add_flags, settings_from_args

if TYPE_CHECKING:
    from services.gateway.config import GatewayConfig

LOG = logging.getLogger("bedside")
NAME = "gateway"
HELP = "run the gateway against a running Triton"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, NAME)


def config_from_args(args: argparse.Namespace, triton_url: str) -> GatewayConfig:
    """The gateway's configuration from ``bedside gateway`` / ``bedside serve`` flags, once the
    operator has chosen TLS or plaintext (keys or --no-auth is a required flag group)."""
    from services.gateway.config import GatewayConfig

    if not args.plaintext and (args.tls_cert is None or args.tls_key is None):
        raise ConfigError("choose TLS for HTTP and gRPC (--tls-cert and --tls-key, optionally "
                          "--tls-ca for client certificates) or --plaintext explicitly")
    return GatewayConfig(**{**settings_from_args(args), "triton_grpc_url": triton_url})


def serve_until_interrupted(args: argparse.Namespace, triton_url: str) -> None:
    from services.gateway.app import Gateway

    gateway = Gateway(config_from_args(args, triton_url))
    try:
        gateway.start()
        LOG.info("serving; Ctrl-C to stop")
        threading.Event().wait()
    except KeyboardInterrupt:
        LOG.info("stopping")
    finally:
        gateway.stop()


def run(args: argparse.Namespace) -> int:
    serve_until_interrupted(args, args.triton_url)
    return 0
