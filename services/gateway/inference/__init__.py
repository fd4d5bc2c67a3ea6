"""Inference, free of protocols and storage: a checked data set -> model input -> Triton ->
findings.

    core.py       ``InferenceCore`` (header checks per the manifest, preprocess, infer,
                  postprocess), ``Result``, the ``Inferer`` protocol
    triton.py     the Triton gRPC client with deadlines, retries and a circuit breaker;
                  ``load_versions`` (Triton's explicit model control)
    versions.py   ``VersionedCore``: a model's primary, shadow and canary versions as one core
    agreement.py  agreement of two versions on one input (decisions, score error, Dice)

May import: dicom
"""
