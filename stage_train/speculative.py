"""EAGLE-3 chain speculative decoding with an HF Llama target, and the plain baseline it beats.

One round, for a sequence whose verified tokens are ``x_0..x_n`` (``x_n`` not yet seen by the
target, whose ``DynamicCache`` holds ``x_0..x_{n-1}``):

1. the draft proposes ``d_1..d_K`` from its prefix cache (``Eagle3DraftRunner.propose``);
2. the target runs once over ``[x_n, d_1..d_K]`` with its KV cache, and forward hooks capture
   the aux layers at those K+1 positions;
3. the longest acceptable prefix ``d_1..d_a`` is kept and one more token comes from the target
   (the correction on a rejection, the bonus when all K pass), so a round gains ``a + 1``
   tokens for one target forward;
4. the target cache is cropped back to the verified positions (``x_0..x_n, d_1..d_a``) and the
   draft's prefix cache is extended with those ``a + 1`` positions, each paired with the token
   that follows it (``d_1..d_a`` and the new token), the EAGLE-3 step-0 input.

Greedy verification (temperature 0) accepts ``d_j`` iff it is the target's argmax, so the output
is exactly the target's own greedy generation.  At temperature > 0 the standard rejection rule
(accept with ``min(1, p/q)``, else resample from ``norm(max(p - q, 0))``) makes the output
distributed exactly as sampling from the target, whatever the draft proposes.

The baseline (``target_generate``) is the same target with the same ``DynamicCache`` one token
per forward, so a speed-up measured against it is the draft's, not a cache implementation's.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch
from transformers import DynamicCache

from stage_extract.features import capture_layer_outputs
from stage_train.draft_inference import DraftProposal

__all__ = [
    "AcceptanceStats",
    "Drafter",
    "GenerationOutput",
    "eos_token_ids",
    "speculative_generate",
    "target_generate",
    "verify_greedy",
    "verify_sampling",
]


class Drafter(Protocol):
    """What the decoding loop needs from a draft (``Eagle3DraftRunner`` implements it)."""

    def reset(self) -> None: ...

    def extend(self, aux_hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor: ...

    def propose(self, k: int, temperature: float = 0.0, generator: torch.Generator | None = None) -> DraftProposal: ...


@dataclass
class GenerationOutput:
    """Tokens generated for one prompt and what it cost.

    ``accepted`` has one entry per verification round (the number of draft tokens accepted,
    0..K); it is empty for the baseline.  ``target_forwards`` counts the prefill as well.
    ``seconds`` is wall time including the prefill (device-synchronised).
    """

    tokens: list[int]
    seconds: float
    target_forwards: int
    accepted: list[int] = field(default_factory=list)
    draft_tokens: int = 0


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends a turn: the generation config's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return frozenset(ids)


def _finish(tokens: list[int], max_new_tokens: int, eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Cut at the first eos (kept) and at ``max_new_tokens``; say whether generation is over."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in eos_ids:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


def _cache_kwargs(model, cache: DynamicCache) -> dict:
    """``cache=`` (transformers >= 5.2x) or ``past_key_values=`` (earlier 5.x), whichever exists."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------------ verification rules
def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: accept while ``d_j == argmax(target_logits[j])``.

    ``target_logits`` [K+1, V] are the target's logits at ``[x_n, d_1..d_K]``.  Returns
    (accepted count a, the target's token after the accepted prefix).
    """
    choice = target_logits.argmax(dim=-1)
    k = draft_tokens.numel()
    matches = (choice[:k] == draft_tokens).int()
    accepted = int(matches.cumprod(0).sum())
    return accepted, int(choice[accepted])


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The speculative-sampling rejection rule over the target vocabulary.

    ``draft_probs`` [K, V] is q_j (the draft's distribution at depth j, mapped to target ids)
    and ``target_probs`` [K+1, V] is p_j.  ``d_j`` is accepted with probability
    ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the next token is drawn from
    ``norm(max(p_j - q_j, 0))``; if all K pass, the bonus is drawn from ``p_K``.  The emitted
    tokens are then distributed exactly as sampling from p, token by token.
    """
    k = draft_tokens.numel()
    uniforms = torch.rand(k, generator=generator, device=target_probs.device) if k else None
    for j in range(k):
        token = int(draft_tokens[j])
        p, q = float(target_probs[j, token]), float(draft_probs[j, token])
        if q > 0 and float(uniforms[j]) * q < p:  # u < p/q without dividing
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp_min(0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else target_probs[j]
        return j, int(torch.multinomial(dist, 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


# ------------------------------------------------------------------------ decoding loops
@torch.no_grad()
def target_generate(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Plain autoregressive decoding: one target forward per token, ``DynamicCache``."""
    device = input_ids.device
    _sync(device)
    started = time.perf_counter()
    cache = _cache_kwargs(model, DynamicCache(config=model.config))
    logits = model(input_ids=input_ids, logits_to_keep=1, **cache).logits[0, -1]
    tokens = [_sample(logits, temperature, generator)]
    forwards = 1
    while not _finish(tokens, max_new_tokens, eos_ids)[1]:
        step = torch.tensor([[tokens[-1]]], device=device)
        logits = model(input_ids=step, **cache).logits[0, -1]
        tokens.append(_sample(logits, temperature, generator))
        forwards += 1
    _sync(device)
    tokens, _ = _finish(tokens, max_new_tokens, eos_ids)
    return GenerationOutput(tokens=tokens, seconds=time.perf_counter() - started, target_forwards=forwards)


def _aux(captured: dict[int, torch.Tensor], layer_ids: tuple[int, ...], dtype: torch.dtype, round_to: torch.dtype | None) -> torch.Tensor:
    aux = torch.cat([captured[i] for i in layer_ids], dim=-1)
    if round_to is not None:
        aux = aux.to(round_to)
    return aux.to(dtype)


@torch.no_grad()
def speculative_generate(
    model,
    drafter: Drafter,
    input_ids: torch.Tensor,
    *,
    layer_ids: tuple[int, ...],
    draft_tokens: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    draft_dtype: torch.dtype = torch.float32,
    aux_round_dtype: torch.dtype | None = torch.bfloat16,
) -> GenerationOutput:
    """EAGLE-3 chain speculative decoding of one prompt ``input_ids`` [1, n].

    ``layer_ids`` are the target layers whose outputs feed the draft's ``fc`` (low, mid, high;
    output-of-layer, 0-based).  The aux states are rounded through ``aux_round_dtype``
    (bf16: what a bf16 serving engine hands the draft, and how the default cache stores them)
    before reaching the draft, so an fp32 CPU target does not feed features finer than any the
    draft was trained on.  Returns the tokens
    (cut at the first eos and at ``max_new_tokens``) and the accepted count of every round.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence, got input_ids of shape {tuple(input_ids.shape)}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    device = input_ids.device
    _sync(device)
    started = time.perf_counter()
    cache = DynamicCache(config=model.config)
    cache_kwargs = _cache_kwargs(model, cache)
    drafter.reset()
    accepted_counts: list[int] = []
    with capture_layer_outputs(model, layer_ids) as captured:
        logits = model(input_ids=input_ids, logits_to_keep=1, **cache_kwargs).logits[0, -1]
        tokens = [_sample(logits, temperature, generator)]
        forwards = 1
        if not _finish(tokens, max_new_tokens, eos_ids)[1]:
            first = torch.tensor([[tokens[0]]], device=device)
            drafter.extend(
                _aux(captured, layer_ids, draft_dtype, aux_round_dtype), torch.cat([input_ids[:, 1:], first], dim=1)
            )
        while not _finish(tokens, max_new_tokens, eos_ids)[1]:
            proposal = drafter.propose(draft_tokens, temperature, generator)
            chain = proposal.token_ids.to(device)
            verify_in = torch.cat([torch.tensor([tokens[-1]], device=device), chain])[None]
            logits = model(input_ids=verify_in, **cache_kwargs).logits[0].float()
            forwards += 1
            if temperature > 0:
                if proposal.probs is None:
                    raise ValueError("sampling verification needs the draft's distributions (proposal.probs)")
                target_probs = torch.softmax(logits / temperature, dim=-1)
                accepted, next_token = verify_sampling(chain, proposal.probs.to(device), target_probs, generator)
            else:
                accepted, next_token = verify_greedy(chain, logits)
            accepted_counts.append(accepted)
            rejected = draft_tokens - accepted
            if rejected:
                cache.crop(-rejected)  # negative: drop the rejected tail (every transformers 5.x)
            new_tokens = chain[:accepted].tolist() + [next_token]
            tokens.extend(new_tokens)
            if _finish(tokens, max_new_tokens, eos_ids)[1]:
                break
            aux = _aux(captured, layer_ids, draft_dtype, aux_round_dtype)[:, : accepted + 1]
            drafter.extend(aux, torch.tensor([new_tokens], device=device))
    _sync(device)
    tokens, _ = _finish(tokens, max_new_tokens, eos_ids)
    return GenerationOutput(
        tokens=tokens,
        seconds=time.perf_counter() - started,
        target_forwards=forwards,
        accepted=accepted_counts,
        draft_tokens=draft_tokens,
    )


# ------------------------------------------------------------------------ statistics
@dataclass
class AcceptanceStats:
    """Acceptance over many rounds of K-token chains.

    ``histogram[a]`` counts rounds that accepted exactly ``a`` draft tokens (0..K).
    ``tau`` is the mean tokens gained per verification forward (accepted + 1); the per-depth
    acceptance at depth d is the share of rounds whose first d draft tokens were all accepted.
    """

    draft_tokens: int
    histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.histogram:
            self.histogram = [0] * (self.draft_tokens + 1)

    def add(self, accepted: Iterable[int]) -> None:
        for a in accepted:
            if not 0 <= a <= self.draft_tokens:
                raise ValueError(f"accepted count {a} outside 0..{self.draft_tokens}")
            self.histogram[a] += 1

    @property
    def rounds(self) -> int:
        return sum(self.histogram)

    @property
    def tau(self) -> float:
        if not self.rounds:
            return float("nan")
        return sum((a + 1) * n for a, n in enumerate(self.histogram)) / self.rounds

    def per_position_acceptance(self) -> list[float]:
        rounds = self.rounds
        if not rounds:
            return [float("nan")] * self.draft_tokens
        return [sum(self.histogram[d:]) / rounds for d in range(1, self.draft_tokens + 1)]
