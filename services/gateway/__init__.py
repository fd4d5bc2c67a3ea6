"""The DICOM-ingest and inference gateway, one sub-package per stage of the flow.

    edges/       protocol edges: DIMSE, DICOMweb STOW-RS, REST, Open Inference Protocol
    security/    authentication, TLS, admission (guard, rate limits), audit, de-identification
    intake/      durable acceptance shared by the acknowledging edges: check, spool, enqueue
    processing/  the background worker: spooled instances -> groups -> selection -> results
    inference/   the protocol-free inference core and the Triton client
    store/       durable state on the spool volume: spool files, job table, result store
    delivery/    routing completed groups to destinations: SR/SEG, outbox, C-STORE / STOW-RS
    dicom/       reading DICOM bytes safely, and the image SOP classes the gateway takes

Modules at this level:

    app.py, outbox_cli.py   the composition root: the only modules that may import edges/
                            (and anything else); they wire the packages together
    config.py               the gateway's frozen configuration, validated once at start; each
                            setting declared once: default, command flag, chart value
    errors.py               the gateway's errors (root ``GatewayError``), each with a bounded reason
    status.py               the one status table: error -> HTTP, gRPC, DIMSE, STOW-RS, Retry-After
    phi.py                  ``uid_hash``: how a UID may appear in logs, metrics and audit
    metrics.py              every gateway metric, defined once
    jsonbody.py             bounded JSON parsing (size, depth) of every JSON body read

The modules at this level other than the composition root are leaves: they import no
sub-package, and every sub-package may import them. Each sub-package's docstring says what it
owns and, on its ``May import:`` line, which other sub-packages it may import;
``tests/gateway/test_layering.py`` enforces those lines.

From the optimizer, any module here may import ``optimizer.contract`` (the torch-free model
contract: manifest, preprocessing, series, findings, the root error) and nothing else, so the
gateway runs without torch (``tests/optimizer/contract/test_boundary.py``,
``tests/gateway/test_torch_free.py``).
"""
