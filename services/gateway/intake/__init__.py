"""Durable acceptance, shared by every edge that acknowledges before inferring (DIMSE C-STORE,
DICOMweb STOW-RS, the JSON study API): capacity and header checks, the spool, the job row, the
hand-off to the worker.

    ingest.py     ``Ingestor``: check, then accept (spooled and recorded before the ack)

May import: processing, inference, store, dicom
"""
