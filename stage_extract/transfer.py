"""Device-to-host copies that never stall the target's forward.

On CUDA, :meth:`HostTransfer.submit` queues the copies of a batch's features on a side stream
(ordered after the forward that produced them) into pinned host memory and returns at once with
a :class:`HostBatch` holding a CUDA event; the background part writer calls
:meth:`HostBatch.wait` before it touches the bytes.  The main thread therefore never blocks on a
copy and keeps queueing forwards.  On CPU the tensors are already on the host: no stream, no
event, no copy, so CPU extraction behaves exactly as a plain synchronous loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class HostBatch:
    """A batch's feature planes on the host (valid once :meth:`wait` returns)."""

    tensors: dict[str, torch.Tensor]
    lengths: list[int]
    samples: list[int]  # positions of the batch rows in the part's pending list
    event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def numpy(self, name: str) -> np.ndarray:
        """A plane as numpy; bf16 planes become their uint16 bit patterns (zero-copy)."""
        tensor = self.tensors[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16)
        return tensor.numpy()


class HostTransfer:
    """Copies feature planes from ``device`` to the host, asynchronously on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, tensors: dict[str, torch.Tensor], lengths: list[int], samples: list[int]) -> HostBatch:
        if self.stream is None:
            return HostBatch({k: v.detach() for k, v in tensors.items()}, list(lengths), list(samples))
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)
        host: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self.stream):
            for name, tensor in tensors.items():
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffer.copy_(tensor, non_blocking=True)
                tensor.record_stream(self.stream)  # keep the device memory until the copy ran
                host[name] = buffer
            event = torch.cuda.Event(blocking=True)  # a waiting part writer sleeps instead of spinning a core
            event.record(self.stream)
        return HostBatch(host, list(lengths), list(samples), event)
