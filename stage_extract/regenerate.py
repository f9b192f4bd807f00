"""`talon regenerate`: let the target answer the user turns of a chat dataset itself.

A draft learns to predict its target, so training on the target's own answers (rather than on
ShareGPT's ChatGPT replies) moves the training distribution onto what the draft will see when
serving; the recommended public EAGLE-3 datasets are regenerated this way.

For every conversation the source's assistant turns are dropped and the target answers each
user turn in order, given the *regenerated* history (system turns are kept).  Conversations
are processed in batches: all conversations of a batch advance one user turn at a time through
one left-padded ``generate`` call (greedy by default).

Output is JSONL in OpenAI ``messages`` form, one line per source record, each carrying its
``record_index``.  Lines are appended and flushed as batches finish, so a killed run resumes
by reading the finished indices and skipping them; a half-written last line (a kill during a
write) is cut off before appending.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.config import DEVICES, ConfigError
from pipeline.runtime import compute_dtype, resolve_device
from stage_extract.records import ChatRecord, RecordStats, iter_chat_records

__all__ = [
    "RegenerateConfig",
    "finished_indices",
    "regenerated_history",
    "render_generation_prompt",
    "run_regenerate",
]


@dataclass(frozen=True)
class RegenerateConfig:
    """Settings of `talon regenerate` (validated here, once)."""

    target: str
    data: str
    out: Path
    max_new_tokens: int = 512
    batch_size: int = 8
    max_prompt_tokens: int = 4096
    temperature: float = 0.0
    seed: int = 0
    limit: int | None = None
    device: str = "auto"
    skip_bad_records: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be positive")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be positive")
        if self.max_prompt_tokens < 1:
            raise ConfigError("--max-prompt-tokens must be positive")
        if not self.temperature >= 0:
            raise ConfigError("--temperature must be >= 0 (0 is greedy)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be positive")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}")
        if Path(self.out).suffix != ".jsonl":
            raise ConfigError(f"--out must be a .jsonl file, got {self.out}")


# ---------------------------------------------------------------------------- prompts
def render_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` followed by the assistant header, as the target is served.

    Rendered with the tokenizer's own chat template (``add_generation_prompt=True``) and
    tokenised without extra special tokens, exactly like the training conversations
    (``stage_extract.chat``), so no BOS is doubled.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def regenerated_history(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
    """The source conversation without assistant turns, and where replies must be generated.

    Returns (system + user messages in order, the index in that list after which each user
    turn's reply goes).  Every user turn gets a reply, including a trailing one.
    """
    kept = [dict(m) for m in messages if m["role"] != "assistant"]
    return kept, [i for i, m in enumerate(kept) if m["role"] == "user"]


# ---------------------------------------------------------------------------- resume
def finished_indices(out: Path) -> set[int]:
    """Record indices already written to ``out``; cuts off a half-written last line.

    Every complete line ends with a newline (it is written in one piece); text after the last
    newline, or a last line that does not parse, is what a kill during a write leaves, and is
    truncated away so that appending continues on a clean line.  A bad line anywhere else
    means the file is not ours or was edited: that is an error naming the line.
    """
    out = Path(out)
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    cut = raw.rfind(b"\n") + 1
    lines = raw[:cut].split(b"\n")[:-1]
    done: set[int] = set()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            index = int(record["record_index"])
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines) and cut == len(raw):
                # The last complete-looking line is itself broken: treat it as the torn write.
                cut = len(raw) - len(line) - 1
                break
            raise ValueError(f"{out}:{number}: not a regenerated record ({err}); refusing to append to it") from None
        done.add(index)
    if cut != len(raw):
        with out.open("r+b") as handle:
            handle.truncate(cut)
    return done


# ---------------------------------------------------------------------------- generation
def _batched(records: Iterator[ChatRecord], size: int) -> Iterator[list[ChatRecord]]:
    batch: list[ChatRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[list[int]], cfg: RegenerateConfig, generator_seed: int) -> list[tuple[list[int], bool]]:
    """Left-padded batched ``generate``; returns (new tokens without padding/eos tail, hit the cap)."""
    device = model.device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    kwargs: dict[str, Any] = {"do_sample": False}
    if cfg.temperature > 0:
        torch.manual_seed(generator_seed)
        kwargs = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad, **kwargs,
    )
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    results = []
    for row in out[:, width:].tolist():
        tokens: list[int] = []
        ended = False
        for token in row:
            if token in eos_ids:
                ended = True
                break
            tokens.append(token)
        results.append((tokens, not ended))
    return results


def _regenerate_batch(model, tokenizer, batch: list[ChatRecord], cfg: RegenerateConfig, stats: dict[str, int]) -> list[dict[str, Any]]:
    """Answer every user turn of a batch of conversations, turn by turn."""
    histories, slots = zip(*(regenerated_history(r.messages) for r in batch))
    conversations: list[list[dict[str, str]]] = [[] for _ in batch]
    cursor = [0] * len(batch)  # next kept message to copy into the conversation
    active = [bool(s) for s in slots]
    capped = [0] * len(batch)
    for turn in range(max((len(s) for s in slots), default=0)):
        prompts, rows = [], []
        for row, record in enumerate(batch):
            if not active[row] or turn >= len(slots[row]):
                continue
            upto = slots[row][turn] + 1
            conversations[row].extend(histories[row][cursor[row]:upto])
            cursor[row] = upto
            prompt = render_generation_prompt(tokenizer, conversations[row])
            if len(prompt) > cfg.max_prompt_tokens:
                # End the conversation before this unanswered user turn.
                conversations[row].pop()
                active[row] = False
                stats["prompts_too_long"] += 1
                continue
            prompts.append(prompt)
            rows.append(row)
        if not prompts:
            continue
        seed = cfg.seed + 1_000_003 * batch[0].record_index + turn
        for row, (tokens, hit_cap) in zip(rows, _generate(model, tokenizer, prompts, cfg, seed)):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            conversations[row].append({"role": "assistant", "content": text})
            stats["generated_tokens"] += len(tokens) + (0 if hit_cap else 1)
            stats["turns"] += 1
            capped[row] += int(hit_cap)
    lines = []
    for row, record in enumerate(batch):
        if active[row]:
            # Trailing system messages after the last user turn are kept as they were.
            conversations[row].extend(histories[row][cursor[row]:])
        lines.append({
            "record_index": record.record_index,
            "source": record.source,
            "messages": conversations[row],
            "regenerated_turns": sum(1 for m in conversations[row] if m["role"] == "assistant"),
            "hit_max_new_tokens": capped[row],
        })
    return lines


def run_regenerate(cfg: RegenerateConfig) -> dict[str, Any]:
    """Regenerate ``cfg.data`` into ``cfg.out``, resuming after the records already there."""
    from stage_extract.target import load_target

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_indices(out)
    device = resolve_device(cfg.device)
    tokenizer, model = load_target(cfg.target, device=device, dtype=compute_dtype(device))
    source_stats = RecordStats()
    records = (r for r in iter_chat_records(cfg.data, skip_bad_records=cfg.skip_bad_records, stats=source_stats, require_assistant=False)
               if r.record_index not in done)
    if cfg.limit is not None:
        records = (r for _, r in zip(range(cfg.limit), records))
    stats = {"generated_tokens": 0, "turns": 0, "prompts_too_long": 0}
    written = 0
    started = time.perf_counter()
    bar = tqdm(total=cfg.limit, desc="regenerate", unit="conv", disable=not cfg.progress, dynamic_ncols=True)
    try:
        with out.open("a", encoding="utf-8") as handle:
            for batch in _batched(records, cfg.batch_size):
                lines = _regenerate_batch(model, tokenizer, batch, cfg, stats)
                # One write per batch: a kill leaves at most one torn line, cut off on resume.
                handle.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
                written += len(lines)
                bar.update(len(lines))
                bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(time.perf_counter() - started, 1e-9):.1f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    return {
        "out": str(out),
        "target": cfg.target,
        "records_written": written,
        "records_resumed": len(done),
        "turns": stats["turns"],
        "prompts_too_long": stats["prompts_too_long"],
        "generated_tokens": stats["generated_tokens"],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(stats["generated_tokens"] / max(seconds, 1e-9), 1),
        "source_stats": source_stats.as_dict(),
        "device": str(device),
    }
