"""Backend-neutral feature computation: the one thing `talon extract` needs from an engine.

A *feature backend* turns one part's tokenised samples into feature batches: the cache's
per-token planes (``aux_hidden``, ``aux_scale``, ``topk_ids``, ``topk_logprobs``,
``final_hidden``, plus the ``finite`` flag per token), rows of several samples concatenated, and
for every batch the positions of its samples in the list it was given.  That is exactly what
run.py hands to ``HostTransfer.submit`` and the part writer collects, so the code that fills
parts, and the training that reads them, cannot tell which engine produced a cache.

Two backends exist: :class:`HFBackend` (transformers forward with layer hooks, on packed or
padded batches) and
:class:`stage_extract.vllm_backend.VLLMBackend` (vLLM's ``extract_hidden_states``).
:meth:`compute` gives the same features keyed by record index, for comparisons and tests.

This module must stay importable without vLLM: the HF path never imports it, and the vLLM backend
module only imports vLLM when an engine starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.batching import consecutive_batches, length_sorted_batches
from schemas.layout import DEFAULT_BATCHING, check_feature_settings
from stage_extract.cuda_graphs import GraphedPackedForward
from stage_extract.features import BatchFeatures, extract_batch, extract_packed
from stage_extract.packed_attention import PackedInputs, pack_samples

BACKENDS = ("hf", "vllm")
FEATURE_PLANES = ("aux_hidden", "aux_scale", "topk_ids", "topk_logprobs", "final_hidden")

# (record_index, input_ids int64 [T]): what a backend is asked to compute.
Sample = tuple[int, np.ndarray]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (an optional extra is missing); the message says how
    to install it."""


@dataclass
class FeatureBatch:
    """Features of some of the samples given to a backend, rows concatenated in ``positions``
    order.  ``planes`` maps cache array names (plus ``finite``, [rows] bool) to tensors on the
    backend's :attr:`FeatureBackend.device`."""

    positions: list[int]  # indices into the samples passed to feature_batches()
    record_indices: list[int]
    lengths: list[int]
    planes: dict[str, torch.Tensor]


class SampleOutput(NamedTuple):
    """One sample's features on the CPU (absent planes are None)."""

    aux_hidden: torch.Tensor  # [T, 3H] bfloat16 (uint8 e4m3fn codes when fp8)
    topk_ids: torch.Tensor | None  # [T, k] int32
    topk_logprobs: torch.Tensor | None  # [T, k] float32, normalised over the full vocab
    final_hidden: torch.Tensor | None = None  # [T, H] bfloat16, pre-norm output of the last layer
    aux_scale: torch.Tensor | None = None  # [T, 3] float32 (fp8 only)
    finite: torch.Tensor | None = None  # [T] bool


@runtime_checkable
class FeatureBackend(Protocol):
    """What run.py needs from an engine."""

    name: str
    device: torch.device  # where the planes of its FeatureBatches live

    def feature_batches(self, samples: Sequence[Sample]) -> Iterator[FeatureBatch]: ...

    def compute(self, samples: Sequence[Sample]) -> dict[int, SampleOutput]: ...

    def close(self) -> None: ...


def check_unique_records(samples: Sequence[Sample]) -> None:
    """Results are keyed by record index, so two samples with one index would overwrite each other."""
    seen: set[int] = set()
    for record_index, _ in samples:
        if int(record_index) in seen:
            raise ValueError(f"record {record_index} was passed twice in one batch of samples; record indices must be unique")
        seen.add(int(record_index))


def split_batch(batch: FeatureBatch) -> dict[int, SampleOutput]:
    """A feature batch cut back into per-record outputs, on the CPU."""
    host = {name: tensor.cpu() for name, tensor in batch.planes.items()}
    out: dict[int, SampleOutput] = {}
    start = 0
    for record, n in zip(batch.record_indices, batch.lengths):
        rows = slice(start, start + n)
        start += n
        out[record] = SampleOutput(
            aux_hidden=host["aux_hidden"][rows],
            topk_ids=host["topk_ids"][rows] if "topk_ids" in host else None,
            topk_logprobs=host["topk_logprobs"][rows] if "topk_logprobs" in host else None,
            final_hidden=host["final_hidden"][rows] if "final_hidden" in host else None,
            aux_scale=host["aux_scale"][rows] if "aux_scale" in host else None,
            finite=host["finite"][rows] if "finite" in host else None,
        )
    return out


class _KeyedCompute:
    """``compute`` for any backend, on top of its ``feature_batches``."""

    def compute(self, samples: Sequence[Sample]) -> dict[int, SampleOutput]:
        check_unique_records(samples)
        results: dict[int, SampleOutput] = {}
        for batch in self.feature_batches(samples):  # type: ignore[attr-defined]
            for record, output in split_batch(batch).items():
                if record in results:
                    raise RuntimeError(f"record {record} came back twice from the {self.name} backend")  # type: ignore[attr-defined]
                results[record] = output
        missing = sorted({int(r) for r, _ in samples} - set(results))
        if missing:
            raise RuntimeError(f"the {self.name} backend returned no features for records {missing[:10]}")  # type: ignore[attr-defined]
        return results


class HFBackend(_KeyedCompute):
    """The transformers path behind the backend protocol.  ``batching="packed"`` (the default):
    the samples in order, up to the token budget a batch, each batch one row through
    :func:`extract_packed` (no padding; attention kept within each sample).  ``"padded"``:
    length-sorted right-padded batches through :func:`extract_batch`.

    The model is owned by the caller (run.py loads it once for the target identity and the
    cache's target head too), so :meth:`close` leaves it alone.

    On CUDA the next batch is prepared while the previous forward runs, but its kernels are
    queued only once that forward has finished, waiting on an event (which releases the GIL).
    Queueing further ahead gains nothing for batches that run a second or more, and it fills
    CUDA's launch queue (~1,000 kernels, about one 8B forward): the launching thread then blocks
    inside kernel launches while holding the GIL, which starves the part writers' threads.

    ``cuda_graphs`` (packed batches on CUDA): the forwards are replayed from CUDA graphs
    (:mod:`stage_extract.cuda_graphs`), one launch per batch instead of one per kernel.  A
    replay is one launch, so the next one is queued before the previous forward ends (two in
    flight), and the GPU does not idle while the main thread hands a batch over.
    """

    name = "hf"

    def __init__(
        self,
        model,
        *,
        layer_ids: tuple[int, ...],
        top_k: int,
        batch_tokens: int,
        device: torch.device,
        feature_dtype: str = "bf16",
        teacher: str = "topk",
        head_chunk_tokens: int = 4096,
        batching: str = DEFAULT_BATCHING,
        cuda_graphs: bool = False,
    ):
        check_feature_settings(feature_dtype, teacher)
        if batching not in ("packed", "padded"):
            raise ValueError(f"the hf backend batches packed or padded, not {batching!r}")
        if cuda_graphs and (batching != "packed" or torch.device(device).type != "cuda"):
            raise ValueError("CUDA graphs replay packed forwards on a CUDA device only")
        self.batching = batching
        self.model = model
        self.layer_ids = tuple(layer_ids)
        self.top_k = int(top_k)
        self.batch_tokens = int(batch_tokens)
        self.device = torch.device(device)
        self.feature_dtype = feature_dtype
        self.teacher = teacher
        self.head_chunk_tokens = int(head_chunk_tokens)
        self.graphed = GraphedPackedForward(self._packed_forward, budget=self.batch_tokens, device=self.device) if cuda_graphs else None
        self._in_flight: deque[torch.cuda.Event] = deque()  # ends of the queued forwards (CUDA)

    def feature_batches(self, samples: Sequence[Sample]) -> Iterator[FeatureBatch]:
        check_unique_records(samples)
        if not samples:
            return
        lengths = np.array([len(ids) for _, ids in samples])
        for batch in self.plan(lengths):
            row_lengths = [int(lengths[s]) for s in batch]
            token_ids = [samples[s][1] for s in batch]
            if self.graphed is not None:  # padded to its static shape in pinned memory
                prepared = self.graphed.prepare(host_inputs(token_ids, self.batching))
            else:
                inputs = host_inputs(token_ids, self.batching, pin=self.device.type == "cuda")
            depth = 2 if self.graphed is not None and self.graphed.replaying else 1  # forwards queued at once
            while len(self._in_flight) >= depth:  # GIL-free wait, see the class docstring
                self._in_flight.popleft().synchronize()
            features = self.graphed.run(prepared) if self.graphed is not None else self.extract_inputs(inputs)
            if self.device.type == "cuda":
                event = torch.cuda.Event(blocking=True)
                event.record(torch.cuda.current_stream(self.device))
                self._in_flight.append(event)
            yield FeatureBatch(
                positions=[int(s) for s in batch],
                record_indices=[int(samples[s][0]) for s in batch],
                lengths=row_lengths,
                planes=features.tensors(),
            )

    def plan(self, lengths: np.ndarray) -> list[np.ndarray]:
        """The batches (indices into ``lengths``) the samples go through the target in."""
        return plan_batches(lengths, self.batch_tokens, self.batching)

    def _common(self) -> dict:
        return dict(layer_ids=self.layer_ids, top_k=self.top_k, feature_dtype=self.feature_dtype,
                    teacher=self.teacher, head_chunk_tokens=self.head_chunk_tokens)

    def _packed_forward(self, packed: PackedInputs) -> BatchFeatures:
        return extract_packed(self.model, packed, **self._common())

    def extract_inputs(self, inputs) -> BatchFeatures:
        """The features of one batch given as :func:`host_inputs` makes it (on the host; packed
        inputs may also be on the device already when no graphs are used)."""
        if isinstance(inputs, PackedInputs):
            if self.graphed is not None:
                return self.graphed(inputs)
            return self._packed_forward(inputs.to(self.device))
        ids, mask, row_lengths = inputs
        return extract_batch(self.model, ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True),
                             lengths=row_lengths, **self._common())

    def graph_stats(self) -> dict | None:
        """Captures, replays and eager batches of the CUDA graphs (None without graphs)."""
        return self.graphed.stats() if self.graphed is not None else None

    def close(self) -> None:
        pass


def plan_batches(lengths: np.ndarray, batch_tokens: int, batching: str) -> list[np.ndarray]:
    """Packed: the samples in order, up to ``batch_tokens`` real tokens a batch.  Padded:
    length-sorted, up to ``batch_tokens`` padded tokens a batch."""
    if batching == "packed":
        return consecutive_batches(lengths, batch_tokens)
    return length_sorted_batches(lengths, batch_tokens)


def host_inputs(token_ids: Sequence[np.ndarray], batching: str, *, pin: bool = False):
    """The forward's inputs for one batch, on the host: :class:`PackedInputs`, or the padded
    ``(input_ids, attention_mask, lengths)``."""
    if batching == "packed":
        return pack_samples(token_ids, pin=pin)
    lengths = [len(ids) for ids in token_ids]
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (tokens, n) in enumerate(zip(token_ids, lengths)):
        ids[row, :n] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        mask[row, :n] = 1
    if pin:
        ids, mask = ids.pin_memory(), mask.pin_memory()
    return ids, mask, lengths


def open_backend(
    name: str,
    *,
    model=None,
    target_path: str | None = None,
    layer_ids: tuple[int, ...],
    top_k: int,
    batch_tokens: int,
    max_length: int,
    device: torch.device,
    feature_dtype: str = "bf16",
    teacher: str = "topk",
    batching: str = DEFAULT_BATCHING,
    cuda_graphs: bool = False,
    vllm_options=None,
) -> FeatureBackend:
    """Build the backend ``--backend`` names.  ``hf`` wraps the already loaded ``model``; ``vllm``
    starts a vLLM engine on ``target_path`` (an HF folder; its final norm and LM head run on
    ``device``) and raises :class:`BackendUnavailable` with the install command when vLLM is not
    installed."""
    if name == "hf":
        if model is None:
            raise ValueError("the hf backend needs the loaded target model")
        return HFBackend(
            model, layer_ids=layer_ids, top_k=top_k, batch_tokens=batch_tokens, device=device,
            feature_dtype=feature_dtype, teacher=teacher, batching=batching, cuda_graphs=cuda_graphs,
        )
    if name == "vllm":
        if target_path is None:
            raise ValueError("the vllm backend needs the target's HF folder")
        from stage_extract.vllm_backend import VLLMBackend, VLLMOptions

        return VLLMBackend.open(
            target_path,
            layer_ids=layer_ids,
            top_k=top_k,
            max_length=max_length,
            feature_dtype=feature_dtype,
            teacher=teacher,
            options=vllm_options if vllm_options is not None else VLLMOptions(),
            head_device=device,
        )
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
