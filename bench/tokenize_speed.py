"""How fast chat records are tokenised ahead of the forwards, with no model and no writers.

The same synthetic chats as ``extract_speed.py``, through :func:`stage_extract.tokenize_ahead
.tokenize_ahead` inline (record by record in the consuming thread, as on CPU), in a background
thread (chunks, as on a GPU by default) and with tokenizer processes.  Per setting: the whole
run's tokens/s (process start-up included) and the steady rate after the first quarter of the
tokens, which a long extraction runs at.  A small target's packed forward needs ~370k tokens/s on
an H200; this says whether the tokenizer can feed it.

    python bench/tokenize_speed.py --tokens 2000000 --modes inline,thread,4,8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, smollm2_tokenizer, synthetic_chats, use_tokenizer_start_method  # noqa: E402


def measure(data: Path, tokenizer, mode: str, max_length: int) -> tuple[int, float, float, float | None]:
    """(tokens, whole-run tok/s, steady tok/s after the first quarter of the tokens, seconds until
    the tokenizer processes were up or None)."""
    import stage_extract.tokenize_ahead as ahead
    from stage_extract.records import RecordStats, iter_chat_records
    from stage_extract.tokenize_ahead import tokenize_ahead

    stats = RecordStats()
    started = time.perf_counter()
    up: list[float] = []
    original_start = ahead._BackgroundPool._start

    def start(self, *args):
        original_start(self, *args)
        if self.ready():
            up.append(time.perf_counter() - started)

    ahead._BackgroundPool._start = start
    marks = []  # (clock, tokens so far)
    tokens = 0
    workers = 0 if mode in ("inline", "thread") else int(mode)
    for item in tokenize_ahead(iter_chat_records(str(data), stats=stats), stats, tokenizer, max_length=max_length,
                               workers=workers, background=mode != "inline"):
        if item.tokens is not None:
            tokens += len(item.tokens.input_ids)
            marks.append((time.perf_counter(), tokens))
    ended = time.perf_counter()
    ahead._BackgroundPool._start = original_start
    quarter = next((clock, n) for clock, n in marks if n >= tokens / 4)
    return tokens, tokens / (ended - started), (tokens - quarter[1]) / max(ended - quarter[0], 1e-9), (up or [None])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens of synthetic chat")
    parser.add_argument("--modes", default="inline,thread,4,8",
                        help="comma-separated: inline, thread, or a number of tokenizer processes")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tokenizer-start", default=None, choices=("fork", "forkserver", "spawn"),
                        help="how tokenizer processes start (default: the run path's: fork on Linux, else the fork server)")
    args = parser.parse_args()
    use_tokenizer_start_method(args.tokenizer_start)
    import os

    tokenizer = smollm2_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="talon-tokenize-speed-"))
    data = synthetic_chats(work / "chats.jsonl", max(8, args.tokens // 350), seed=1)
    rows = []
    for mode in args.modes.split(","):
        tokens, whole, steady, up = measure(data, tokenizer, mode, args.max_length)
        rows.append([mode, tokens, f"{whole:,.0f}", f"{steady:,.0f}", f"{up:.1f}" if up is not None else "n/a"])
        print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr)
    print(f"\n### Tokenising ahead ({os.cpu_count()} cores)\n")
    print(markdown_table(["mode", "tokens", "whole run tok/s", "steady tok/s (after the first quarter)",
                                "seconds until the processes were up"], rows))


if __name__ == "__main__":
    main()
