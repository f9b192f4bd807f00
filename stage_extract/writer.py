"""Turning computed samples into sealed parts, off the critical path.

:class:`PartBuilder` gathers finished samples of one part in record order.
:class:`BackgroundPartWriter` writes parts (Zarr group, then seal) in a worker thread behind a
bounded queue, so the target keeps computing while the previous part is compressed and written.
An error in the worker surfaces in the caller at the next ``submit`` or at ``close``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas.layout import part_name
from schemas.manifest import PartSeal, write_seal
from schemas.store import write_part_group


@dataclass
class SampleFeatures:
    record_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    aux_hidden: np.ndarray  # uint16 bf16 bits, [T, 3H]
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


@dataclass
class PartBuilder:
    """One part's samples plus the bookkeeping its seal needs."""

    index: int
    first_record: int
    samples: list[SampleFeatures] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    nonfinite_records: list[int] = field(default_factory=list)
    records_consumed: int = 0
    last_record: int = -1

    def drop(self, record_index: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason == "nonfinite":
            self.nonfinite_records.append(record_index)

    def arrays(self) -> dict[str, np.ndarray]:
        lengths = [len(s.input_ids) for s in self.samples]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def cat(name: str, empty_shape: tuple[int, ...], dtype) -> np.ndarray:
            parts = [getattr(s, name) for s in self.samples]
            return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)

        return {
            "input_ids": cat("input_ids", (0,), np.int64),
            "loss_mask": cat("loss_mask", (0,), np.uint8),
            "aux_hidden": cat("aux_hidden", (0, 0), np.uint16),
            "topk_ids": cat("topk_ids", (0, 0), np.int64),
            "topk_logprobs": cat("topk_logprobs", (0, 0), np.float32),
            "sample_offsets": offsets,
            "record_index": np.asarray([s.record_index for s in self.samples], dtype=np.int64),
        }

    def seal(self, arrays: dict[str, np.ndarray], records, source_stats: dict[str, int]) -> PartSeal:
        mask = arrays["loss_mask"].astype(bool)
        tokens, counts = np.unique(arrays["input_ids"][mask], return_counts=True)
        return PartSeal(
            index=self.index,
            name=part_name(self.index),
            n_samples=len(self.samples),
            n_tokens=int(arrays["input_ids"].shape[0]),
            n_assistant_tokens=int(mask.sum()),
            first_record=self.first_record,
            last_record=self.last_record,
            records_consumed=self.records_consumed,
            dropped=dict(self.dropped),
            nonfinite_records=tuple(self.nonfinite_records),
            source_stats=dict(source_stats),
            arrays=records,
            assistant_token_counts={int(t): int(c) for t, c in zip(tokens, counts)},
        )


class BackgroundPartWriter:
    """Writes parts in a worker thread; at most ``max_pending`` parts wait in memory."""

    def __init__(self, cache_dir: Path, vocab_size: int, max_pending: int = 2):
        self._cache_dir = Path(cache_dir)
        self._vocab_size = vocab_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.sealed: list[PartSeal] = []
        self._thread = threading.Thread(target=self._work, name="talon-part-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            builder, source_stats = item
            try:
                arrays = builder.arrays()
                records = write_part_group(self._cache_dir, part_name(builder.index), arrays, self._vocab_size)
                seal = builder.seal(arrays, records, source_stats)
                write_seal(self._cache_dir, seal)
                self.sealed.append(seal)
            except BaseException as err:  # surfaced to the caller, never swallowed
                self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a part under {self._cache_dir} failed: {self._error}") from self._error

    def submit(self, builder: PartBuilder, source_stats: dict[str, int]) -> None:
        self._raise_if_failed()
        self._queue.put((builder, dict(source_stats)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
