"""The ``bedside`` command: demo, optimize, serve, gateway, keys.

Errors that Bedside raises on purpose end the command with a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from optimizer.errors import BedsideError
from services.errors import ConfigError

if TYPE_CHECKING:
    from services.gateway.config import GatewayConfig

LOG = logging.getLogger("bedside")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # pydicom's own warnings can quote element values (names, UIDs): keep them out of logs.
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for noisy in ("onnxscript", "onnx_ir", "torch", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _default_triton_env() -> Path:
    """$BEDSIDE_TRITON_ENV, else .venv-triton beside this environment (scripts/dev.sh's layout:
    .venv and .venv-triton side by side in the checkout), wherever the command runs from."""
    if "BEDSIDE_TRITON_ENV" in os.environ:
        return Path(os.environ["BEDSIDE_TRITON_ENV"]).absolute()
    return Path(sys.prefix).parent / ".venv-triton"


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bedside", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="synthesize, train, optimize, serve and query, locally")
    demo.add_argument("--out", type=Path, default=Path("bedside-demo"))
    demo.add_argument("--quick", action="store_true", help="tiny data (smoke test)")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--triton-env", type=Path, default=None,
                      help="Triton's Python environment (default $BEDSIDE_TRITON_ENV, else "
                           ".venv-triton beside Bedside's own environment)")

    opt = sub.add_parser("optimize", help="checkpoint + manifest -> verified Triton repository")
    opt.add_argument("--checkpoint", type=Path, required=True)
    opt.add_argument("--manifest", type=Path, required=True)
    opt.add_argument("--calibration", type=Path, required=True,
                     help="folder of DICOM files with labels.csv")
    opt.add_argument("--validation", type=Path, required=True,
                     help="folder of labelled DICOM files with labels.csv")
    opt.add_argument("--out", type=Path, required=True)
    opt.add_argument("--threads", type=int, default=2)
    opt.add_argument("--precisions", default=None,
                     help="comma-separated, from fp32, fp16, bf16, int8 (fp32 is always built; "
                          "default: fp32,fp16,int8 for cpu and gpu, fp32,fp16,bf16 for "
                          "gpu-torch)")
    opt.add_argument("--calibration-methods", default="minmax,percentile,entropy",
                     help="INT8 calibration methods to try; the validation set picks one")
    opt.add_argument("--objective", default="latency",
                     choices=["latency", "throughput", "throughput-within-slo"])
    opt.add_argument("--target", default="cpu", choices=["cpu", "gpu", "gpu-torch"],
                     help="cpu: python backend + ONNX Runtime; gpu: onnxruntime + TensorRT; "
                          "gpu-torch: python backend + PyTorch on a CUDA GPU (needs one here)")
    opt.add_argument("--calibration-limit", type=int, default=64,
                     help="calibration inputs used at most")
    opt.add_argument("--recovery-max-fraction", type=float, default=0.5,
                     help="share of the graph INT8 recovery may keep in FP32")
    opt.add_argument("--fp16-io", default="fp32", choices=["fp32", "fp16"],
                     help="I/O of the FP16 variant (fp32 keeps callers unchanged)")
    opt.add_argument("--no-recovery", action="store_true",
                     help="do not keep sensitive nodes in FP32 when INT8 misses the budget")
    opt.add_argument("--mae-tolerance", action="append", default=[], metavar="PRECISION=MAE",
                     help="override a verification threshold, e.g. int8=0.1 (repeatable)")

    ref = sub.add_parser("reference", help="write a reference model (random weights), its "
                         "manifest and synthetic calibration/validation data, for optimize")
    ref.add_argument("--model", required=True, choices=["densenet121", "unet2d", "unet3d"])
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--side", type=int, default=None, help="input side (smaller = faster)")
    ref.add_argument("--calibration", type=int, default=32)
    ref.add_argument("--validation", type=int, default=64)

    tun = sub.add_parser("tune", help="sweep Triton's batching and instance settings and "
                         "write the best config.pbtxt")
    tun.add_argument("--repository", type=Path, required=True)
    tun.add_argument("--model", required=True)
    tun.add_argument("--out", type=Path, default=None, help="default: ./tune-<model>")
    tun.add_argument("--triton-url", default=None,
                     help="a Triton in explicit model-control mode; default: start one here")
    tun.add_argument("--triton-env", type=Path, default=None)
    tun.add_argument("--latency-budget-ms", type=float, default=None,
                     help="p95 budget (default: the manifest's latency_slo_ms)")
    tun.add_argument("--concurrency", default="1,4,8")
    tun.add_argument("--queue-delays-us", default="0,500,2000")
    tun.add_argument("--instances", default="1,2")
    tun.add_argument("--seconds", type=float, default=2.0, help="per measured point")

    srv = sub.add_parser("serve", help="run Triton and the gateway on a model repository")
    gw = sub.add_parser("gateway", help="run the gateway against a running Triton")
    for cmd in (srv, gw):
        cmd.add_argument("--repository", type=Path, required=True,
                         help="Triton model repository (the model's manifest.json is read)")
        cmd.add_argument("--model", required=True)
        cmd.add_argument("--spool", type=Path, default=Path("bedside-spool"))
        cmd.add_argument("--http-host", default="127.0.0.1")
        cmd.add_argument("--http-port", type=int, default=8080)
        cmd.add_argument("--dicom-host", default="127.0.0.1")
        cmd.add_argument("--dicom-port", type=int, default=11112)
        cmd.add_argument("--ae-title", default="BEDSIDE")
        cmd.add_argument("--allowed-ae", action="append", default=[], metavar="AE_TITLE",
                         help="calling AE title allowed to associate (repeatable; none given: "
                              "any calling AE title)")
        cmd.add_argument("--max-pdu", type=int, default=1024 * 1024,
                         help="largest DIMSE PDU accepted, bytes (0: no limit)")
        cmd.add_argument("--max-associations", type=int, default=8)
        cmd.add_argument("--max-association-bytes", type=int, default=0,
                         help="data-set bytes one DIMSE association may carry; beyond, "
                              "C-STORE answers 0xA700 (0: no limit)")
        cmd.add_argument("--grpc-port", type=int, default=8081,
                         help="Open Inference Protocol v2 gRPC port on --http-host (0: off)")
        cmd.add_argument("--tls-cert", type=Path, default=None,
                         help="server certificate (PEM) for HTTP, gRPC and DICOM TLS; "
                              "re-read when it changes")
        cmd.add_argument("--tls-key", type=Path, default=None,
                         help="private key of --tls-cert (PEM)")
        cmd.add_argument("--tls-ca", type=Path, default=None,
                         help="CA bundle for client certificates: required on DICOM TLS and "
                              "gRPC, optional on HTTP (else an API key)")
        cmd.add_argument("--min-free-bytes", type=int, default=1024**3,
                         help="refuse new work below this much free spool disk (0 = off)")
        cmd.add_argument("--triton-breaker-failures", type=int, default=5,
                         help="consecutive Triton-unavailable failures that open the breaker")
        cmd.add_argument("--triton-breaker-cooldown", type=float, default=5.0,
                         help="seconds before an open breaker lets one probe through")
        cmd.add_argument("--group-level", choices=("instance", "series", "study"), default=None,
                         help="group instances before inferring (default: the manifest's "
                              "grouping.level)")
        cmd.add_argument("--group-timeout", type=float, default=None, metavar="SECONDS",
                         help="a group closes after this long without a new instance "
                              "(default: the manifest's grouping.timeout_s)")
        cmd.add_argument("--job-retention", type=float, default=7 * 86400.0, metavar="SECONDS",
                         help="finished job-table rows are deleted after this long")
        cmd.add_argument("--routes", type=Path, metavar="FILE",
                         help="routes file (YAML/JSON): deliver DICOM results (SR/SEG) to "
                              "destinations by C-STORE or STOW-RS, optionally de-identified")
        # Security: the operator must choose keys or --no-auth, and TLS or --plaintext.
        auth = cmd.add_mutually_exclusive_group(required=True)
        auth.add_argument("--api-keys", type=Path, default=None, metavar="FILE",
                          help="API keys file (YAML/JSON, hashed keys and scopes; re-read "
                               "when it changes); see `bedside keys new`")
        auth.add_argument("--no-auth", action="store_true",
                          help="no authentication on HTTP and gRPC (trusted networks only)")
        cmd.add_argument("--plaintext", action="store_true",
                         help="HTTP and gRPC without TLS (required unless --tls-cert/--tls-key"
                              " are given; with them, only DIMSE keeps TLS)")
        cmd.add_argument("--dicom-plaintext", action="store_true",
                         help="DIMSE without TLS even though --tls-cert/--tls-key are given")
        cmd.add_argument("--allowed-source", action="append", default=[], metavar="CIDR",
                         help="source network allowed on HTTP and gRPC (repeatable; none "
                              "given: any)")
        cmd.add_argument("--rate-limit", type=float, default=50.0,
                         help="requests per second per API key / client certificate (0: off)")
        cmd.add_argument("--rate-burst", type=float, default=100.0,
                         help="requests a key may send at once before --rate-limit applies")
        cmd.add_argument("--max-concurrent", type=int, default=64,
                         help="infer/submit calls in progress at once over HTTP and gRPC; "
                              "more get 503 / RESOURCE_EXHAUSTED (0: no cap)")
        cmd.add_argument("--audit-log", type=Path, default=None, metavar="FILE",
                         help="append the audit trail (JSON lines) to FILE; '-' for stdout "
                              "(default: the log)")
        cmd.add_argument("--audit-syslog", default=None, metavar="HOST:PORT|SOCKET",
                         help="also send audit records to syslog (UDP host:port or /dev/log)")
    srv.add_argument("--triton-grpc-port", type=int, default=8001)
    srv.add_argument("--triton-env", type=Path, default=None)
    gw.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton gRPC host:port")

    keys = sub.add_parser("keys", help="gateway API keys: `bedside keys new --name X "
                          "--scopes infer,read` prints a key once with its keys-file entry")
    from services.gateway.security.auth import add_subcommands as add_keys_subcommands

    add_keys_subcommands(keys)

    outbox = sub.add_parser("outbox", help="results delivery: list the gateway's outbox, "
                            "requeue dead-letter rows (`bedside outbox --spool DIR list`)")
    from services.gateway.outbox_cli import add_subcommands as add_outbox_subcommands

    add_outbox_subcommands(outbox)

    dep = sub.add_parser("deploy", help="install or upgrade the Helm release for a model, wait "
                         "for the rollout and the model, roll back on failure")
    dep.add_argument("--repository", type=Path, required=True,
                     help="the optimizer's --out folder or its repository/ folder")
    dep.add_argument("--model", default=None, help="needed when the repository has several")
    dep.add_argument("--release", default="bedside")
    dep.add_argument("--namespace", default="bedside")
    dep.add_argument("--chart", type=Path, default=None, help="default: the bundled "
                     "charts/bedside")
    dep.add_argument("-f", "--values", type=Path, action="append", default=[],
                     help="a values file (repeatable; later files win)")
    dep.add_argument("--set", dest="set_values", action="append", default=[],
                     metavar="KEY=VALUE", help="a value, Helm --set syntax (repeatable)")
    dep.add_argument("--timeout", type=float, default=900.0, help="seconds, rollout included")
    dep.add_argument("--kubeconfig", type=Path, default=None)
    dep.add_argument("--context", default=None)
    dep.add_argument("--dry-run", action="store_true",
                     help="render every object (hooks included) without a cluster")
    dep.add_argument("--out", type=Path, default=None,
                     help="with --dry-run: write one file per template here, not to stdout")
    return p


def _gateway_config(args: argparse.Namespace, triton_url: str) -> GatewayConfig:
    from services.gateway.config import GatewayConfig

    if not args.plaintext and (args.tls_cert is None or args.tls_key is None):
        raise ConfigError("choose TLS for HTTP and gRPC (--tls-cert and --tls-key, optionally "
                          "--tls-ca for client certificates) or --plaintext explicitly")

    return GatewayConfig(
        model_repository=args.repository.absolute(), model_name=args.model,
        triton_grpc_url=triton_url, spool_dir=args.spool.absolute(), http_host=args.http_host,
        http_port=args.http_port, dicom_host=args.dicom_host, dicom_port=args.dicom_port,
        ae_title=args.ae_title, allowed_calling_aets=tuple(args.allowed_ae),
        max_pdu_bytes=args.max_pdu, max_associations=args.max_associations,
        max_association_bytes=args.max_association_bytes,
        grpc_port=args.grpc_port,
        tls_cert=args.tls_cert.absolute() if args.tls_cert else None,
        tls_key=args.tls_key.absolute() if args.tls_key else None,
        tls_ca=args.tls_ca.absolute() if args.tls_ca else None,
        min_free_bytes=args.min_free_bytes, triton_breaker_failures=args.triton_breaker_failures,
        triton_breaker_cooldown_s=args.triton_breaker_cooldown,
        group_level=args.group_level, group_timeout_s=args.group_timeout,
        job_retention_s=args.job_retention,
        routes_file=args.routes.absolute() if args.routes else None,
        api_keys=args.api_keys.absolute() if args.api_keys else None,
        http_tls=not args.plaintext, dicom_tls=not args.dicom_plaintext,
        allowed_sources=tuple(args.allowed_source), rate_limit_per_s=args.rate_limit,
        rate_limit_burst=args.rate_burst, max_concurrent_requests=args.max_concurrent,
        audit_log=(args.audit_log if str(args.audit_log) == "-" else args.audit_log.absolute())
        if args.audit_log else None,
        audit_syslog=args.audit_syslog,
    )


def _run_until_interrupted(args: argparse.Namespace, triton_url: str) -> None:
    from services.gateway.app import Gateway

    gateway = Gateway(_gateway_config(args, triton_url))
    try:
        gateway.start()
        LOG.info("serving; Ctrl-C to stop")
        threading.Event().wait()
    except KeyboardInterrupt:
        LOG.info("stopping")
    finally:
        gateway.stop()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from exc


def _tune(args: argparse.Namespace) -> int:
    from optimizer.tune import Grid, tune
    from services.net import free_port
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

    grid = Grid(queue_delays_us=_ints(args.queue_delays_us), instances=_ints(args.instances),
                concurrencies=_ints(args.concurrency))
    repo = args.repository.absolute()
    out = (args.out or Path(f"tune-{args.model}")).absolute()
    triton = None
    url = args.triton_url
    if url is None:
        install = TritonInstall.discover(args.triton_env or _default_triton_env())
        triton = TritonServer(install, repo, out / "triton",
                              TritonPorts(free_port(), free_port(), free_port()),
                              explicit_models=True)
        triton.start()
        url = triton.grpc_url
    try:
        result = tune(url, repo, args.model, grid, args.seconds, args.latency_budget_ms, out)
    finally:
        if triton is not None:
            triton.stop()
    print((out / "tune.md").read_text(encoding="utf-8"))
    print(f"wrote {repo / args.model / 'config.pbtxt'} ({result['chosen']})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.net import free_port
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

    install = TritonInstall.discover(args.triton_env or _default_triton_env())
    triton = TritonServer(install, args.repository.absolute(), args.spool.absolute() / "triton",
                          TritonPorts(free_port(), args.triton_grpc_port, free_port()))
    try:
        triton.start()
        _run_until_interrupted(args, triton.grpc_url)
    finally:
        triton.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    # Stop cleanly on SIGTERM (Kubernetes, systemd) as on Ctrl-C, also when started from a
    # non-interactive shell that leaves SIGINT ignored for background jobs.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "demo":
            from services.demo import DemoSizes, run_demo

            sizes = DemoSizes.quick() if args.quick else DemoSizes()
            return run_demo(args.out.absolute(), args.triton_env or _default_triton_env(),
                            sizes, threads=args.threads)
        if args.command == "optimize":
            from optimizer.pipeline import DEFAULT_PRECISIONS, OptimizeRequest, optimize

            try:
                tolerances = {k: float(v) for k, v in
                              (item.split("=", 1) for item in args.mae_tolerance)}
                request = OptimizeRequest(
                    checkpoint=args.checkpoint, manifest=args.manifest,
                    calibration_dir=args.calibration, validation_dir=args.validation,
                    out_dir=args.out, threads=args.threads,
                    precisions=tuple(args.precisions.split(",")) if args.precisions
                    else DEFAULT_PRECISIONS[args.target],
                    calibration_methods=tuple(args.calibration_methods.split(",")),
                    objective=args.objective, target=args.target,
                    recovery=not args.no_recovery, mae_tolerances=tolerances,
                    fp16_io=args.fp16_io, calibration_limit=args.calibration_limit,
                    recovery_max_fraction=args.recovery_max_fraction,
                )
            except ValueError as exc:
                print(f"bedside: error: {exc}", file=sys.stderr)
                return 2
            result = optimize(request)
            print(result.report_md.read_text(encoding="utf-8"))
            return 0
        if args.command == "tune":
            return _tune(args)
        if args.command == "reference":
            from optimizer.reference import write_reference

            write_reference(args.model, args.out, args.side, args.calibration, args.validation)
            o = args.out
            print(f"wrote {args.model} to {o}; next:\n  bedside optimize --checkpoint "
                  f"{o}/model.pt --manifest {o}/manifest.json --calibration {o}/calibration "
                  f"--validation {o}/validation --out {o}/optimized")
            return 0
        if args.command == "keys":
            from services.gateway.security.auth import run as run_keys

            return run_keys(args)
        if args.command == "outbox":
            from services.gateway.outbox_cli import run as run_outbox

            return run_outbox(args)
        if args.command == "deploy":
            from services.deploy.command import run_deploy

            return run_deploy(args)
        if args.command == "gateway":
            _run_until_interrupted(args, args.triton_url)
            return 0
        return _serve(args)
    except BedsideError as exc:
        print(f"bedside: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bedside: interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
