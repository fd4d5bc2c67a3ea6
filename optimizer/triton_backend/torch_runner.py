"""Run a TorchScript model on a CUDA GPU at one precision, optionally through CUDA graphs.

One copy of this file serves both sides of the ``gpu-torch`` target: ``bedside optimize``
imports it to verify and benchmark each variant, and the optimizer copies it next to the
python-backend ``model.py`` in the Triton model repository, so Triton serves exactly what was
verified. It therefore imports nothing but torch (Triton's environment has no Bedside).

Precisions: ``fp32`` (TF32 off, so FP32 means FP32), ``fp16`` and ``bf16`` (weights and
activations in that type, channels-last memory; inputs and outputs stay FP32 at the edges).
CUDA graphs: one graph is captured per batch bucket (1, 2, 4, ... up to ``max_batch``); a call
copies its batch into the smallest bucket that holds it (the rest of the bucket is zeros),
replays the graph and returns the first rows. Graph replay removes the per-kernel launch cost
that dominates small-batch latency on a large GPU.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two, then ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


class TorchRunner:
    """A model on one device, at one precision, with or without CUDA graphs.

    ``__call__`` takes an FP32 tensor (any device) and returns an FP32 tensor on the same
    device as the input. Not thread-safe: one runner per serving instance.
    """

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, ...], precision: str,
                 device: str = "cuda", cuda_graphs: bool = False, max_batch: int = 8,
                 warmup: int = 3) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("CUDA graphs need a CUDA device")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.precision = precision
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        self.cuda_graphs = cuda_graphs
        self.max_batch = max_batch
        self.input_shape = tuple(input_shape)
        if self.device.type == "cuda":
            # FP32 must mean FP32: cuDNN convolutions default to TF32 on Ampere and newer.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        module = module.eval().to(self.device)
        if precision != "fp32":
            module = module.to(self.dtype)
        if len(self.input_shape) == 3:  # (C, H, W): tensor cores prefer channels-last
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module
        self._warmup = warmup
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if cuda_graphs:
            self._capture()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).to(self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # TorchScript's profiling executor would re-optimize (and compile fusions) after a few
        # calls, possibly inside a graph capture: run its graph as plain ops instead.
        with torch.jit.optimized_execution(False):
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def _capture(self) -> None:
        pool = None
        for size in sorted(buckets(self.max_batch), reverse=True):  # largest first: one pool
            static_in = torch.zeros((size, *self.input_shape), device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(self._warmup):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                static_out = self._forward(static_in)
            pool = graph.pool()
            self._graphs[size] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        home = x.device
        with torch.inference_mode():
            if not self.cuda_graphs:
                return self._forward(x).to(home)
            parts = [self._replay(x[i:i + self.max_batch])
                     for i in range(0, x.shape[0], self.max_batch)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            return out.to(home)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = next(b for b in sorted(self._graphs) if b >= n)
        graph, static_in, static_out = self._graphs[size]
        static_in[:n].copy_(x, non_blocking=True)
        if n < size:
            static_in[n:].zero_()
        graph.replay()
        return static_out[:n].clone()


def load_torchscript(path: str, device: str) -> torch.nn.Module:
    """A TorchScript file saved by ``bedside optimize --target gpu-torch``."""
    return torch.jit.load(path, map_location=device)
