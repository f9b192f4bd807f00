"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the draft (with its d2t/t2d vocab mapping, which is therefore reused on
resume and never regenerated), the optimizer and scheduler, the data position, the RNG states,
the metric window and the resolved config.  It is written into a temp directory and renamed,
then ``checkpoints/latest.json`` is replaced atomically, so a kill at any moment leaves the
previous checkpoint usable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from schemas.jsonio import read_json, write_json_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        torch.save({**payload, "step": step}, staging / STATE_FILE)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(root / LATEST, {"step": step, "path": name})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    entry = read_json(pointer)
    path = Path(run_dir) / CHECKPOINTS / entry["path"] / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is missing")
    return torch.load(path, map_location="cpu", weights_only=False)
