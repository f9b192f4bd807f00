"""Batches of cached features for the draft, read straight from the Zarr parts.

Samples are grouped by length under a token budget (seeded shuffle per epoch), read with one
ranged read per array, padded on the right, and prefetched in a background thread so the
trainer never waits for I/O on the next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import shuffled_bucket_batches
from schemas.store import CacheReader


@dataclass
class FeatureBatch:
    """A padded batch as stored (nothing shifted yet)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool
    aux_hidden_states: torch.Tensor  # [B, T, 3H] bfloat16
    topk_ids: torch.Tensor  # [B, T, k] int64
    topk_logprobs: torch.Tensor  # [B, T, k] float32
    n_tokens: int

    def to(self, device: torch.device) -> "FeatureBatch":
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "topk_ids", "topk_logprobs")
        }
        return FeatureBatch(**moved, n_tokens=self.n_tokens)


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def load_batch(reader: CacheReader, samples: np.ndarray, max_length: int | None = None) -> FeatureBatch:
    rows = [reader.read_sample(int(i)) for i in samples]
    if max_length is not None:
        rows = [{k: v[:max_length] for k, v in row.items()} for row in rows]
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    aux_width = rows[0]["aux_hidden"].shape[1]
    k = rows[0]["topk_ids"].shape[1]
    batch = len(rows)
    input_ids = np.zeros((batch, width), np.int64)
    attention = np.zeros((batch, width), np.int64)
    loss_mask = np.zeros((batch, width), np.bool_)
    aux = np.zeros((batch, width, aux_width), np.uint16)
    top_ids = np.zeros((batch, width, k), np.int64)
    top_lp = np.zeros((batch, width, k), np.float32)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[b, :n] = row["input_ids"]
        attention[b, :n] = 1
        loss_mask[b, :n] = row["loss_mask"].astype(bool)
        aux[b, :n] = row["aux_hidden"]
        top_ids[b, :n] = row["topk_ids"]
        top_lp[b, :n] = row["topk_logprobs"]
    return FeatureBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        loss_mask=torch.from_numpy(loss_mask),
        aux_hidden_states=bf16_from_bits(aux),
        topk_ids=torch.from_numpy(top_ids),
        topk_logprobs=torch.from_numpy(top_lp),
        n_tokens=int(sum(lengths)),
    )


class BatchPlan:
    """Which samples form each batch, epoch after epoch, reproducibly from a seed."""

    def __init__(self, lengths: np.ndarray, batch_tokens: int, seed: int, max_length: int | None = None):
        self.lengths = np.minimum(lengths, max_length) if max_length else np.asarray(lengths)
        self.batch_tokens = batch_tokens
        self.seed = seed

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        return shuffled_bucket_batches(self.lengths, self.batch_tokens, rng)

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def stream(self, start_epoch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        epoch = start_epoch
        while True:
            for batch in self.epoch(epoch):
                yield epoch, batch
            epoch += 1


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Run ``items`` in a background thread, keeping at most ``depth`` results ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as err:  # re-raised in the consumer
            buffer.put(err)

    thread = threading.Thread(target=work, name="talon-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
