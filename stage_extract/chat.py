"""Tokenisation with the target's own chat template and an assistant-only loss mask.

The draft must see exactly the token stream the target sees at serving time,
so conversations are rendered with ``tokenizer.apply_chat_template`` and never
with a hand-written template. The loss mask must then mark the assistant
tokens for *any* template, without per-model separator arithmetic.

How the mask is found (in order of preference):

1. **``{% generation %}`` markers.** If the template has them and
   transformers' ``return_assistant_tokens_mask`` yields a non-empty mask for
   the same token ids we produce, that mask is used: the template author said
   precisely what the assistant generates.
2. **Prefix diff** (the primary path). For assistant message *i*,
   ``prefix = render(messages[:i], add_generation_prompt=True)`` ends right
   after the assistant header and ``upto = render(messages[:i+1])`` ends right
   after the assistant's end-of-turn text, so ``[len(prefix), len(upto))`` of
   the full rendering is the assistant turn: content plus end-of-turn marker
   (``<|im_end|>``, ``<|eot_id|>``), header excluded.
3. **Content search** (fallback). Some templates are not prefix-stable: they
   render earlier turns differently depending on what follows (e.g. a system
   text that mentions the turn count, or reasoning stripped from old turns).
   Then the assistant content is located in the full text after the previous
   message (preferably together with the assistant header), and extended by
   the end-of-turn text the template emits after a final assistant message,
   as far as the full text agrees with it, i.e. up to the start of the next
   rendered turn. Only if the content cannot be found is an error raised.

**Trailing whitespace decision.** Text after the end-of-turn marker that is
only whitespace (ChatML's ``"\\n"`` after ``<|im_end|>``) is *not* part of the
span. The model stops at the end-of-turn token, so that newline is template
glue it never generates; excluding it makes ChatML agree with Llama-3 (whose
span ends exactly at ``<|eot_id|>``) and with the usual ``{% generation %}``
placement. Whitespace inside the assistant content itself is never trimmed.

Character spans become token labels through the fast tokenizer's offsets
(a token is an assistant token if its characters overlap a span, so a token
straddling the header/content boundary counts as assistant). Tokenizers
without offsets fall back to a token-level prefix diff.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "ChatTemplateError",
    "TokenizedConversation",
    "assistant_char_spans",
    "chat_template_fingerprint",
    "tokenize_conversation",
    "tokenize_conversations",
    "tokenizer_fingerprint",
]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template is missing or cannot be analysed."""


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of one rendered conversation and its assistant-token mask.

    ``input_ids`` is int64 ``[T]``; ``loss_mask`` is uint8 ``[T]`` with 1 on
    tokens the assistant produced (content and end-of-turn marker).
    ``truncated`` tells whether the rendering was longer than ``max_length``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool


# --------------------------------------------------------------------------
# Rendering and character spans
# --------------------------------------------------------------------------


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template; pass the tokenizer of an "
            "instruction-tuned target (or a model/tokenizer folder whose "
            "tokenizer_config.json / chat_template.jinja defines one)"
        )


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):  # defensive: some versions return lists
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _try_render(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str | None:
    """Render, or None if the template refuses this (partial) conversation."""
    try:
        return _render(tokenizer, messages, generation_prompt)
    except Exception:  # noqa: BLE001 - templates raise arbitrary errors
        return None


def _trim_end(full: str, start: int, end: int, content: str) -> int:
    """Drop whitespace after the end-of-turn marker, never inside the content."""
    floor = start
    if content:
        idx = full.find(content, start, end)
        if idx >= 0:
            floor = idx + len(content)
    while end > floor and full[end - 1].isspace():
        end -= 1
    return end


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _search_span(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    i: int,
    full: str,
    cursor: int,
) -> tuple[int, int] | None:
    """Fallback for templates that are not prefix-stable: locate by content.

    Returns the raw (untrimmed) span or None if the content is not found.
    """
    content = messages[i]["content"]
    before_gen = _try_render(tokenizer, messages[:i], True)
    before = _try_render(tokenizer, messages[:i], False)
    header = ""
    if before_gen is not None and before is not None and before_gen.startswith(before):
        header = before_gen[len(before) :]

    start = -1
    needle = content
    for candidate in (content, content.strip()):
        if not candidate:
            continue
        if header:
            idx = full.find(header + candidate, cursor)
            if idx >= 0:
                start, needle = idx + len(header), candidate
                break
        idx = full.find(candidate, cursor)
        if idx >= 0:
            start, needle = idx, candidate
            break
    if start < 0:
        return None
    end = start + len(needle)

    # End-of-turn text: what the template writes after this content when the
    # message is last, kept as far as the full text agrees with it.
    upto = _try_render(tokenizer, messages[: i + 1], False)
    tail = ""
    if upto is not None:
        idx = upto.rfind(needle)
        if idx >= 0:
            tail = upto[idx + len(needle) :]
    end += _common_prefix_len(full[end:], tail)
    eos = getattr(tokenizer, "eos_token", None)
    if end == start + len(needle) and isinstance(eos, str) and eos and full.startswith(eos, end):
        end += len(eos)
    return start, end


def assistant_char_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]], full: str | None = None) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns in the rendering.

    See the module docstring for the prefix-diff / content-search strategy
    and the trailing-whitespace rule. Empty assistant turns found by the
    prefix diff keep their end-of-turn marker; in the content-search fallback
    they are left unmarked (there is nothing to locate).  ``full``, when given,
    must be the whole rendering of ``messages`` (it is the last turn's "upto").
    """
    _require_template(tokenizer)
    if full is None:
        full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0  # end of the last located message (content search starts here)
    last_end = 0  # end of the last assistant span; spans never go backwards
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] != "assistant":
            if content:
                idx = full.find(content, cursor)
                if idx >= 0:
                    cursor = idx + len(content)
            continue
        prefix = _try_render(tokenizer, messages[:i], True) if i > 0 else None
        # the last message's "upto" is the whole conversation: rendered already
        upto = full if i == len(messages) - 1 else _try_render(tokenizer, messages[: i + 1], False)
        span: tuple[int, int] | None = None
        if (
            prefix is not None
            and upto is not None
            and upto.startswith(prefix)
            and full.startswith(upto)
            and len(prefix) >= last_end
        ):
            span = (len(prefix), len(upto))
        else:
            if not content.strip():
                continue
            span = _search_span(tokenizer, messages, i, full, cursor)
            if span is None:
                raise ChatTemplateError(
                    f"cannot locate assistant message {i} in the rendered conversation: "
                    "the chat template is not prefix-stable and does not reproduce the "
                    "message content verbatim"
                )
        start, end = span
        end = _trim_end(full, start, end, content)
        if end > start:
            spans.append((start, end))
        cursor = last_end = max(last_end, end)
    return spans


# --------------------------------------------------------------------------
# Spans -> token mask
# --------------------------------------------------------------------------


def _mask_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)  # zero-width tokens still sit somewhere
    for s, e in spans:
        mask[(starts < e) & (ends > s)] = 1
    return mask


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokens_within(tokenizer: Any, full: str, ids: list[int], pos: int) -> tuple[int, int]:
    """How many leading tokens of ``ids`` lie entirely inside ``full[:pos]``.

    Token-level prefix diff: tokenising ``full[:pos]`` alone agrees with
    ``ids`` up to the boundary, where a BPE merge may differ (``"\n\n"``
    alone vs ``"\n"`` + ``"\n"`` before a letter). The common prefix is
    therefore only a lower bound; tokens after it are admitted one by one
    while decoding still stays inside ``full[:pos]``. Returns the count and
    the length of the text those tokens decode to.
    """
    alone = _encode(tokenizer, full[:pos])
    k = 0
    limit = min(len(alone), len(ids))
    while k < limit and alone[k] == ids[k]:
        k += 1
    if k == len(alone):
        return k, pos
    target = full[:pos]

    def text(j: int) -> str:
        return tokenizer.decode(ids[:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    covered = len(text(k)) if k else 0
    while k < len(ids):
        nxt = text(k + 1)
        if len(nxt) > pos or not target.startswith(nxt):
            break
        k, covered = k + 1, len(nxt)
    return k, covered


def _mask_from_prefixes(tokenizer: Any, full: str, ids: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """Token-level prefix diff for tokenizers without offset mappings.

    Same overlap rule as the offsets path: a token is marked if any of its
    characters fall inside a span.
    """
    mask = np.zeros(len(ids), dtype=np.uint8)
    for s, e in spans:
        lo, _ = _tokens_within(tokenizer, full, ids, s)
        hi, covered = _tokens_within(tokenizer, full, ids, e)
        if covered < e and hi < len(ids):
            hi += 1  # the next token starts before e: it straddles the span end
        mask[lo:hi] = 1
    return mask


def _generation_mask(tokenizer: Any, messages: Sequence[Mapping[str, str]], ids: list[int]) -> np.ndarray | None:
    """Mask from ``{% generation %}`` markers, if the template has them and it works."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not _GENERATION_TAG.search(template):
        return None
    try:
        out = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
        )
        gen_ids = list(out["input_ids"])
        gen_mask = np.asarray(out["assistant_masks"], dtype=np.uint8)
    except Exception:  # noqa: BLE001 - fall back to prefix diff
        return None
    if gen_ids != ids or len(gen_mask) != len(ids) or not gen_mask.any():
        return None
    return gen_mask


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    max_length: int,
) -> TokenizedConversation | None:
    """Render ``messages`` with the tokenizer's chat template and tokenise once.

    The full text is tokenised with ``add_special_tokens=False`` because the
    template already writes BOS and friends. The result is cut to
    ``max_length`` tokens; ``None`` is returned when no assistant token
    survives (nothing to train on).
    """
    return tokenize_conversations(tokenizer, [messages], max_length=max_length)[0]


def tokenize_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_length: int,
) -> list[TokenizedConversation | None]:
    """:func:`tokenize_conversation` of each conversation, with the same results; a fast
    tokenizer encodes all the renderings in one call, which it spreads over the cores outside
    the GIL (the encoding is about half of the per-conversation work)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    _require_template(tokenizer)
    fulls = [_render(tokenizer, messages, False) for messages in conversations]
    if bool(getattr(tokenizer, "is_fast", False)):
        enc = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True) if fulls else {"input_ids": [], "offset_mapping": []}
        encoded = [(list(ids), np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
                   for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]
    else:
        encoded = [(_encode(tokenizer, full), None) for full in fulls]
    return [_masked(tokenizer, messages, full, ids, offsets, max_length)
            for messages, full, (ids, offsets) in zip(conversations, fulls, encoded)]


def _masked(tokenizer: Any, messages: Sequence[Mapping[str, str]], full: str, ids: list[int],
            offsets: np.ndarray | None, max_length: int) -> TokenizedConversation | None:
    """The assistant mask of one encoded rendering, and the cut to ``max_length``."""
    mask = _generation_mask(tokenizer, messages, ids)
    if mask is None:
        spans = assistant_char_spans(tokenizer, messages, full)
        if offsets is not None:
            mask = _mask_from_offsets(offsets, spans)
        else:
            mask = _mask_from_prefixes(tokenizer, full, ids, spans)

    input_ids = np.asarray(ids, dtype=np.int64)
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids = input_ids[:max_length].copy()
        mask = mask[:max_length].copy()
    if not mask.any():
        return None
    return TokenizedConversation(input_ids=input_ids, loss_mask=mask, truncated=truncated)


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------


def _sha256_json(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary, special tokens and tokenizer class name.

    Used to refuse mixing features extracted with different tokenizers. Only
    deterministic, order-independent inputs are hashed (sorted vocab items,
    JSON with sorted keys), so it is stable across processes and hash seeds.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    return _sha256_json({"class": type(tokenizer).__name__, "vocab": vocab, "special_tokens": dict(special)})


def chat_template_fingerprint(tokenizer: Any) -> str:
    """sha256 of the chat template string (of ``""`` if there is none)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # named templates: {name: template}
        template = json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
