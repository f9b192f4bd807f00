"""The draft vocabulary: the target tokens the draft can emit, chosen by assistant-token frequency.

``selected_token_ids[i]`` is the target id of draft id ``i``, sorted ascending (the EAGLE/SpecForge
convention, so ``d2t = selected - arange`` and boolean ``t2d`` indexing agree on the order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DraftVocab:
    selected_token_ids: torch.Tensor  # int64 [V_d], ascending target ids
    coverage: float  # share of assistant-token occurrences the draft vocab can emit

    @property
    def d2t(self) -> torch.Tensor:
        return self.selected_token_ids - torch.arange(len(self.selected_token_ids))

    def t2d(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.selected_token_ids] = True
        return mask


def select_draft_vocab(counts: dict[int, int], vocab_size: int, draft_vocab_size: int) -> DraftVocab:
    """Top ``draft_vocab_size`` tokens by count (ties by lower id); if fewer distinct tokens were
    seen, fill with the lowest unused ids so the size is exactly ``draft_vocab_size``."""
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(f"draft vocab size {draft_vocab_size} must be in [1, {vocab_size}]")
    bad = [t for t in counts if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} in the cache's counts are outside the target vocab ({vocab_size})")
    frequency = np.zeros(vocab_size, dtype=np.int64)
    for token, count in counts.items():
        frequency[token] = count
    order = np.lexsort((np.arange(vocab_size), -frequency))  # by count desc, then id asc
    chosen = np.sort(order[:draft_vocab_size])
    total = int(frequency.sum())
    coverage = float(frequency[chosen].sum() / total) if total else 0.0
    return DraftVocab(torch.from_numpy(chosen.astype(np.int64)), coverage)
