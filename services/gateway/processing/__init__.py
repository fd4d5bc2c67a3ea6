"""The background worker: spooled instances -> groups (series, study) -> selection ->
inference -> stored results -> the group sink (delivery), with retries and crash recovery.

    grouping.py   grouping policy, group keys; ``CompletedGroup`` and ``GroupSink``, what is
                  handed on (slice order, selection rules and series volumes are the model
                  contract's: ``optimizer.contract.series``)
    groups.py     ``Groups``: open and closing groups and their timers (an injected clock)
    recovery.py   ``plan_recovery``: what a stop left in the spool and the job table, and what
                  to re-queue, rejoin, hand on again, finish or remove (a pure plan)
    runner.py     ``Runner``: a due group -> selection -> inference with retry -> stored
                  results (errors included) -> ``sink.accept`` -> group closed, files released
    worker.py     ``SpoolWorker``: the thread, its queue, arrivals, applying the recovery plan

Only worker.py starts a thread; the others are driven by it and tested without one. It hands
completed groups to a ``GroupSink`` it is given; it never imports delivery.

May import: inference, store, dicom
"""
