"""Grouping variable-length samples into padded batches under a token budget.

Both stages use it: extraction to keep padding waste low on the target, training to keep the
draft's step size steady.  A batch of samples padded to its longest member costs
``len(batch) * max_length`` tokens, which is what the budget bounds.
"""

from __future__ import annotations

import numpy as np


def budget_batches(order: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Cut ``order`` (sample indices, already arranged) into consecutive batches whose padded
    size ``count * max_len`` stays within ``batch_tokens``.  A sample longer than the budget gets
    a batch of its own."""
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for position, sample in enumerate(order):
        length = int(lengths[sample])
        candidate = max(longest, length)
        if position > start and candidate * (position - start + 1) > batch_tokens:
            batches.append(order[start:position])
            start, candidate = position, length
        longest = candidate
    if start < len(order):
        batches.append(order[start:])
    return batches


def consecutive_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Samples in their given order, cut into batches of at most ``batch_tokens`` real tokens (for
    packed forwards, where a batch costs its own tokens and nothing is padded).  A sample longer
    than the budget gets a batch of its own."""
    batches: list[np.ndarray] = []
    start, tokens = 0, 0
    for position, length in enumerate(np.asarray(lengths).tolist()):
        if position > start and tokens + length > batch_tokens:
            batches.append(np.arange(start, position))
            start, tokens = position, 0
        tokens += length
    if start < len(lengths):
        batches.append(np.arange(start, len(lengths)))
    return batches


def length_sorted_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Deterministic batches of similar lengths (longest first, so memory peaks early)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return budget_batches(order, np.asarray(lengths), batch_tokens)


def shuffled_bucket_batches(
    lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator, bucket_batches: int = 64
) -> list[np.ndarray]:
    """Seeded shuffle that still batches similar lengths together.

    Samples are shuffled, cut into buckets big enough for ``bucket_batches`` batches, sorted by
    length inside each bucket and batched; the batches are then shuffled again.  Padding stays
    low while every epoch sees a different order.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    order = rng.permutation(len(lengths))
    mean = max(1.0, float(lengths.mean()))
    bucket = max(1, int(bucket_batches * batch_tokens / mean))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(budget_batches(chunk, lengths, batch_tokens))
    permutation = rng.permutation(len(batches))
    return [batches[i] for i in permutation]
