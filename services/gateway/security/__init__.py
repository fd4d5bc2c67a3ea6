"""Who may call, over which channel, and what is written down about it.

    auth.py       API keys and client-certificate subjects, scopes (and ``python -m`` key tool)
    tls.py        TLS contexts for HTTP, gRPC and DICOM, reloaded when certificates rotate
    guard.py      admission for every HTTP and gRPC call: auth, allowlist, rate limit, cap, audit
    ratelimit.py  per-client token buckets and the concurrency cap
    podstate.py   limits shared by a pod's gateway processes (rate buckets, association counts,
                  HTTP connections per source address)
    audit.py      the audit log (hashed UIDs only) and the per-request audit context
    deid.py       PS3.15 basic-profile de-identification of what leaves the gateway, the
                  durable reverse map, re-identification of what comes back about it

A low layer: edges, delivery and DICOM reading use it; it knows no protocol edge (errors are
turned into statuses through ``services.gateway.status``, error bodies are passed in by the
composition root).

May import: (leaves only)
"""
