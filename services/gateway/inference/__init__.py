"""Inference, free of protocols and storage: a checked data set -> model input -> Triton ->
findings.

    core.py       ``InferenceCore`` (header checks per the manifest, preprocess, infer,
                  postprocess), ``Result``, the ``Inferer`` protocol
    triton.py     the Triton gRPC client with deadlines, retries and a circuit breaker

May import: dicom
"""
