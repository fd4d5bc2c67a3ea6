"""The gateway subcommand's flags reach the configuration; bad ones end with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import _parser, main
from services.commands.gateway import config_from_args
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import model_repository


def test_gateway_flags_build_the_config(tmp_path: Path) -> None:
    repo = model_repository(tmp_path)
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    args = _parser().parse_args([
        "gateway", "--repository", str(repo), "--model", TINY_MANIFEST.name,
        "--spool", str(tmp_path / "spool"), "--allowed-ae", "CT1", "--allowed-ae", "PACS",
        "--max-pdu", "65536", "--grpc-port", "9001", "--tls-cert", str(tmp_path / "c.pem"),
        "--tls-key", str(tmp_path / "k.pem"), "--tls-ca", str(tmp_path / "ca.pem"),
        "--min-free-bytes", "0", "--triton-breaker-failures", "3",
        "--triton-breaker-cooldown", "2.5", "--no-auth",
    ])
    config = config_from_args(args, args.triton_url)
    assert config.allowed_calling_aets == ("CT1", "PACS")
    assert (config.max_pdu_bytes, config.grpc_port) == (65536, 9001)
    assert config.tls_ca == tmp_path / "ca.pem"
    assert config.min_free_bytes == 0
    assert (config.triton_breaker_failures, config.triton_breaker_cooldown_s) == (3, 2.5)
    defaults = config_from_args(_parser().parse_args([
        "gateway", "--repository", str(repo), "--model", TINY_MANIFEST.name, "--no-auth",
        "--plaintext"]), "x:1")
    assert defaults.allowed_calling_aets == () and defaults.tls_cert is None


def test_bad_gateway_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = model_repository(tmp_path)
    (tmp_path / "c.pem").write_text("x")
    code = main(["gateway", "--repository", str(repo), "--model", TINY_MANIFEST.name,
                 "--spool", str(tmp_path / "spool"), "--tls-cert", str(tmp_path / "c.pem"),
                 "--no-auth", "--plaintext"])
    assert code == 2 and "both tls_cert and tls_key" in capsys.readouterr().err
