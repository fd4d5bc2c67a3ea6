"""The background worker: spooled instances -> groups (series, study) -> selection ->
inference -> stored results -> the group sink (delivery), with retries and crash recovery.

    grouping.py   grouping policy, group keys, slice order, selection rules, series volumes
    worker.py     ``SpoolWorker``: the queue, recovery, closing groups, the hand-off

It hands completed groups to a ``GroupSink`` it is given; it never imports delivery.

May import: inference, store, dicom
"""
