"""Protocol edges: each turns one wire protocol into calls on intake and inference, and errors
into that protocol's error shape (statuses come from ``services.gateway.status``).

    dimse.py      DICOM DIMSE: C-ECHO, C-STORE (AE-title allowlist, DICOM TLS)
    dicomweb.py   DICOMweb STOW-RS (multipart/related)
    multipart.py  the multipart/related reader STOW-RS uses
    rest.py       the JSON REST API (infer, studies, results), health, readiness, metrics
    oip.py        the protocol-free Open Inference Protocol v2 dataplane
    oip_rest.py   OIP v2 over HTTP/JSON (and binary tensors)
    oip_grpc.py   OIP v2 over gRPC
    models.py     model versions over HTTP: /v1/models status, promote, rollback

Only the composition root (``services.gateway.app``) imports this package. Edges hand
instances to ``intake`` (acknowledge after the spool) or to ``inference`` (synchronous calls);
they never reach into the worker.

May import: intake, inference, store, dicom, security
"""
