"""Bedside optimizer: PyTorch checkpoint -> verified ONNX variants -> Triton model repository."""
