"""CUDA graphs of the packed forward: one launch per batch instead of ~1,000.

A small target's forward is bound by Python launching its kernels, not by the GPU: SmolLM2's
packed forward queues ~800 kernels per batch from the main thread, which the part writers' threads
need too (the GIL).  A CUDA graph records the forward (hooks, attention, LM head, top-k) once per
static shape and replays it with a single call.

Graphs need static shapes, so a packed row is padded (:func:`pad_to_shape`):

* to ``tokens`` = the batch's real tokens rounded up to an eighth of the token budget, with
  *pseudo-samples* (token 0, positions restarting at 0) that attend only among themselves and are
  cut off again after the replay, so the real tokens' features are those of their own forward;
* the cumulative lengths to ``sequences + 1`` entries (trailing zero-length sequences);
* the longest sequence the attention kernel is sized for to ``max_length``, a power of two.

Each distinct :class:`StaticShape` is captured once (the first batch of a shape pays a capture);
all graphs share one memory pool, their inputs live in buffers of the budget's size, and each
replay copies its planes into output buffers of the budget's size, so memory stays at one
forward's worth whatever the number of shapes.  The caller gets copies of the real tokens' rows
(a device-to-device copy, tiny next to the forward), so the next replay never overwrites planes a
device-to-host copy is still reading.

Batches longer than the budget (a sample longer than it gets a batch of its own) run eagerly.  A
capture that fails (a kernel that synchronises with the host, say) warns once and the run goes on
eagerly.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import CUDA_GRAPHS
from stage_extract.features import BatchFeatures
from stage_extract.packed_attention import PackedInputs

TOKEN_STEPS = 8  # a batch is padded to a multiple of budget / TOKEN_STEPS tokens
MIN_SEQUENCES = 8
MIN_MAX_LENGTH = 128


SMALL_TARGET_PARAMETERS = 2_000_000_000  # below this, ``auto`` replays graphs


def use_cuda_graphs(setting: str, *, device: torch.device, batching: str, backend: str = "hf",
                    parameters: int = 0) -> bool:
    """Whether ``--cuda-graphs`` applies.  ``auto``: for the HF backend's packed forwards on CUDA
    of a target under :data:`SMALL_TARGET_PARAMETERS` (``parameters``), where launching the
    kernels costs about what running them does.  A larger target's forward is compute-bound: the
    launches it would save are negligible, and the padding to static shapes costs it (measured on
    the 8B shape: 28.9k tokens/s replayed against 31.4k eager).  ``on``: wherever possible, or an
    error that says why not; ``off``: never."""
    if setting not in CUDA_GRAPHS:
        raise ValueError(f"--cuda-graphs must be one of {', '.join(CUDA_GRAPHS)}, got {setting!r}")
    possible = device.type == "cuda" and batching == "packed" and backend == "hf"
    if setting == "on" and not possible:
        raise ValueError(
            "--cuda-graphs on needs the hf backend's packed forwards on a CUDA device "
            f"(this run: backend {backend}, batching {batching}, device {device.type})"
        )
    if setting == "auto":
        return possible and parameters < SMALL_TARGET_PARAMETERS
    return possible and setting == "on"


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class StaticShape:
    """What a graph is captured for: the row's length, its number of sequences (real samples,
    pseudo-samples and zero-length ones) and the longest sequence the attention is sized for."""

    tokens: int
    sequences: int
    max_length: int


def static_shape(lengths: Sequence[int], budget: int) -> StaticShape | None:
    """The shape a packed row of samples ``lengths`` is padded to, or None when it exceeds the
    budget (it then runs eagerly)."""
    total = int(sum(lengths))
    if not lengths or total > budget:
        return None
    step = max(1, math.ceil(budget / TOKEN_STEPS))
    tokens = min(budget, math.ceil(total / step) * step)
    max_length = min(_next_power_of_two(max(max(lengths), MIN_MAX_LENGTH)), _next_power_of_two(tokens))
    pseudo = math.ceil((tokens - total) / max_length)
    sequences = _next_power_of_two(max(len(lengths) + pseudo, MIN_SEQUENCES))
    return StaticShape(tokens, sequences, max_length)


def pad_to_shape(packed: PackedInputs, shape: StaticShape, *, pin: bool = False) -> PackedInputs:
    """``packed`` (on the host) padded to ``shape``: pseudo-samples of at most
    ``shape.max_length`` tokens fill the row, zero-length sequences fill the boundaries.
    ``lengths`` lists every non-empty sequence, the real samples first.  ``pin``: in pinned
    memory, for non-blocking uploads."""
    real = int(packed.cu_seq_lens[-1])
    pad = shape.tokens - real
    if pad < 0 or max(packed.lengths) > shape.max_length:
        raise ValueError(f"a packed row of {real} tokens (longest {max(packed.lengths)}) does not fit {shape}")
    pseudo = [shape.max_length] * (pad // shape.max_length) + ([pad % shape.max_length] if pad % shape.max_length else [])
    lengths = list(packed.lengths) + pseudo
    if len(lengths) > shape.sequences:
        raise ValueError(f"{len(lengths)} sequences do not fit {shape}")
    ids = torch.empty((1, shape.tokens), dtype=torch.long, pin_memory=pin)
    positions = torch.empty((1, shape.tokens), dtype=torch.long, pin_memory=pin)
    cu = torch.empty(shape.sequences + 1, dtype=torch.int32, pin_memory=pin)
    ids_np, positions_np, cu_np = ids.numpy()[0], positions.numpy()[0], cu.numpy()
    ids_np[:real] = packed.input_ids[0].numpy()
    ids_np[real:] = 0
    positions_np[:real] = packed.position_ids[0].numpy()
    offset = real
    for n in pseudo:
        positions_np[offset : offset + n] = np.arange(n)
        offset += n
    cu_np[:] = shape.tokens
    cu_np[: len(lengths) + 1] = np.cumsum([0] + lengths)
    return PackedInputs(ids, positions, cu, shape.max_length, lengths)


class CudaGraphRecorder:
    """Records a function as a CUDA graph (all graphs share one memory pool) and warms kernels up
    eagerly on a side stream first, as capture requires."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pool = None

    def warm_up(self, fn: Callable[[], BatchFeatures]) -> BatchFeatures:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            result = fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return result

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            # thread_local: the part writers' threads keep synchronising on their copies' events
            # during a capture (global mode would fail their calls, and the capture)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                fn()
        except RuntimeError:
            torch.cuda.set_stream(stream)  # a failed capture may leave its side stream current
            torch.cuda.synchronize(self.device)
            raise
        if self._pool is None:
            self._pool = graph.pool()
        return graph.replay


class PreparedRow(NamedTuple):
    packed: PackedInputs  # as given (an eager forward runs it)
    shape: StaticShape | None  # None: eager
    padded: PackedInputs | None


@dataclass
class _Graph:
    replay: Callable[[], None]
    cu_seq_lens: torch.Tensor  # the graph's own [sequences + 1] input


class GraphedPackedForward:
    """``forward`` (packed device inputs -> :class:`BatchFeatures` of every row token) replayed
    from recorded graphs for rows of at most ``budget`` tokens; eager beyond that, or once a
    capture has failed.  Call it with host :class:`PackedInputs` (pinned for non-blocking uploads).

    ``recorder`` records and warms up (:class:`CudaGraphRecorder` by default; the tests pass one
    that "replays" by rerunning the function, which exercises all the padding, buffer and
    slicing logic on the CPU)."""

    def __init__(self, forward: Callable[[PackedInputs], BatchFeatures], *, budget: int, device: torch.device,
                 recorder=None, max_graphs: int = 64):
        if max_graphs < 1 or budget < 1:
            raise ValueError(f"budget and max_graphs must be positive (got {budget}, {max_graphs})")
        self.forward = forward
        self.budget = int(budget)
        self.device = torch.device(device)
        self.recorder = recorder if recorder is not None else CudaGraphRecorder(self.device)
        self.max_graphs = int(max_graphs)
        self.graphs: OrderedDict[StaticShape, _Graph] = OrderedDict()
        self.captures = 0
        self.replays = 0
        self.eager = 0
        self.disabled_because: str | None = None
        self._ids = torch.zeros((1, self.budget), dtype=torch.long, device=self.device)
        self._positions = torch.zeros((1, self.budget), dtype=torch.long, device=self.device)
        self._outputs: dict[str, torch.Tensor] = {}  # plane -> [budget, ...] buffer the graphs copy into

    def prepare(self, packed: PackedInputs) -> "PreparedRow":
        """The host-side work for a row (its shape and pinned padded inputs), which needs no
        GPU: done while the previous forward still runs."""
        shape = static_shape(packed.lengths, self.budget) if self.disabled_because is None else None
        padded = pad_to_shape(packed, shape, pin=self.device.type == "cuda") if shape is not None else None
        return PreparedRow(packed, shape, padded)

    def run(self, prepared: "PreparedRow") -> BatchFeatures:
        """Queue the row's forward (a replay, a capture then a replay, or eagerly)."""
        packed, shape, padded = prepared
        entry = None
        if shape is not None and self.disabled_because is None:
            entry = self.graphs.get(shape) or self._capture(shape, padded)
        if entry is None:
            self.eager += 1
            return self.forward(packed.to(self.device))
        self.graphs.move_to_end(shape)
        self._upload(padded, entry)
        entry.replay()
        self.replays += 1
        return self._real_rows(sum(packed.lengths), packed.lengths)

    def __call__(self, packed: PackedInputs) -> BatchFeatures:
        return self.run(self.prepare(packed))

    def _upload(self, padded: PackedInputs, entry: _Graph) -> None:
        tokens = padded.input_ids.shape[1]
        self._ids[:, :tokens].copy_(padded.input_ids, non_blocking=True)
        self._positions[:, :tokens].copy_(padded.position_ids, non_blocking=True)
        entry.cu_seq_lens.copy_(padded.cu_seq_lens, non_blocking=True)

    def _run_and_store(self, static: PackedInputs) -> None:
        """What a graph records: the forward, then every plane copied into its output buffer."""
        for name, tensor in self.forward(static).tensors().items():
            self._outputs[name][: tensor.shape[0]].copy_(tensor)

    def _capture(self, shape: StaticShape, padded: PackedInputs) -> _Graph | None:
        cu_seq_lens = torch.zeros(shape.sequences + 1, dtype=torch.int32, device=self.device)
        static = PackedInputs(self._ids[:, : shape.tokens], self._positions[:, : shape.tokens], cu_seq_lens,
                              shape.max_length, list(padded.lengths))
        entry = _Graph(lambda: None, cu_seq_lens)
        self._upload(padded, entry)
        try:
            if not self._outputs:  # allocated outside any capture, from one eager forward
                for name, tensor in self.recorder.warm_up(lambda: self.forward(static)).tensors().items():
                    self._outputs[name] = torch.empty((self.budget, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
            entry.replay = self.recorder.record(lambda: self._run_and_store(static))
        except RuntimeError as err:  # e.g. an operation that synchronises with the host
            self.disabled_because = f"{type(err).__name__}: {err}".splitlines()[0]
            self.graphs.clear()  # never replayed again: give their memory back
            self._outputs.clear()
            warnings.warn(f"CUDA graph capture failed ({self.disabled_because}); the target's forwards run eagerly",
                          RuntimeWarning, stacklevel=3)
            return None
        self.captures += 1
        self.graphs[shape] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry

    def _real_rows(self, real: int, lengths: list[int]) -> BatchFeatures:
        """Copies of the first ``real`` rows of the output buffers (the pseudo-samples dropped)."""
        planes = {name: buffer[:real].clone() for name, buffer in self._outputs.items()}
        return BatchFeatures(
            aux_hidden=planes["aux_hidden"], topk_ids=planes.get("topk_ids"), topk_logprobs=planes.get("topk_logprobs"),
            finite=planes["finite"], lengths=list(lengths), aux_scale=planes.get("aux_scale"),
            final_hidden=planes.get("final_hidden"),
        )

    @property
    def replaying(self) -> bool:
        """Whether rows are replayed (False once a capture has failed)."""
        return self.disabled_because is None

    def stats(self) -> dict:
        """Counts for summaries and benchmarks."""
        return {"captures": self.captures, "replays": self.replays, "eager": self.eager, "graphs": len(self.graphs),
                "disabled_because": self.disabled_because}
