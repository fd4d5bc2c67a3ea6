"""Durable state on the spool volume, and the crash-consistency primitives under it.

    durable.py    directory fsync; SQLite in WAL mode with ``synchronous=FULL`` transactions
    spool.py      acknowledged instances as fsynced files (``incoming/``, ``failed/``)
    jobs.py       the job table: one row per spooled instance, its state, its group; the
                  leases and claims by which several workers (processes, replicas) share it
    jobdb.py      the job table's database: SQLite (default) or PostgreSQL behind one small
                  interface, and the versioned schema migrations of both
    versions.py   which version of each model is primary (after promotion or rollback)
    results.py    one JSON result per instance, named by hashed UIDs

The bottom layer: it knows nothing of inference, protocols or delivery.

May import: (leaves only: config.py names the job table's database)
"""
