"""Write the first N ShareGPT conversations, cut to their first U exchanges, as JSONL.

The quality comparisons of issue #3 train every draft on the same prompts: the ShareGPT
answers for the baseline, the target's own answers (``talon regenerate``) for the variant.
Cutting to a few exchanges keeps regeneration within a short GPU budget.

    python bench/chat_subset.py --n 2000 --max-exchanges 2 --out runs/q/sharegpt.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage_extract.records import iter_chat_records


def cut(messages, max_exchanges: int) -> list[dict[str, str]]:
    """Messages up to and including the ``max_exchanges``-th assistant reply."""
    kept, replies = [], 0
    for message in messages:
        kept.append(dict(message))
        if message["role"] == "assistant":
            replies += 1
            if replies == max_exchanges:
                break
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sharegpt", help="chat source (builtin name or file)")
    parser.add_argument("--n", type=int, default=2000, help="conversations to keep")
    parser.add_argument("--max-exchanges", type=int, default=2, help="user/assistant exchanges kept per conversation")
    parser.add_argument("--out", required=True, help="output .jsonl (OpenAI messages form)")
    args = parser.parse_args()
    written = 0
    with open(args.out, "w", encoding="utf-8") as fh:
        for record in iter_chat_records(args.data, limit=args.n):
            fh.write(json.dumps({"messages": cut(record.messages, args.max_exchanges)}, ensure_ascii=False) + "\n")
            written += 1
    print(json.dumps({"out": args.out, "conversations": written}))


if __name__ == "__main__":
    main()
