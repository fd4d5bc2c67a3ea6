"""Durable acceptance, shared by every edge that acknowledges before inferring (DIMSE C-STORE,
DICOMweb STOW-RS, the JSON study API): capacity and header checks, the spool, the job row, the
hand-off to the worker.

    ingest.py     ``Ingestor``: check, then accept (spooled and recorded before the ack), once
                  per model that takes the instance
    models.py     ``ModelLane`` (one per served model: core, spool, job table, results,
                  worker), ``ModelVersions`` (status, promote, rollback), ``ShadowRecorder``

May import: processing, inference, store, dicom
"""
