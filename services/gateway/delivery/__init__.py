"""Results to their destinations: which route a completed group takes, the DICOM objects built
for it, a durable outbox, and the senders.

    routing.py        routes and destinations configuration (``routes.yaml``) and route choice
    dicom_results.py  results as DICOM: SR (classification), SEG (segmentation), via highdicom
    service.py        ``DeliveryService``: the worker's group sink and the sender threads
    outbox.py         the outbox table: one durable row per (group, destination), its states
    destinations.py   the senders: C-STORE SCU and STOW-RS clients, their status classes

May import: processing, store, security
"""
