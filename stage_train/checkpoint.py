"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the draft (with its d2t/t2d vocab mapping, which is therefore reused on
resume and never regenerated), the optimizer and scheduler, the data position, the RNG states,
the metric window and the resolved config.  It is written into a temp directory and renamed,
then ``checkpoints/latest.json`` is replaced atomically, so a kill at any moment leaves the
previous checkpoint usable.

A checkpoint has one format whatever the world: the full (unsharded) draft state dict and the
optimizer state keyed by parameter position, exactly as a single process writes them.  Under
FSDP2 the sharded parameters and optimizer states are gathered for it (a collective every rank
joins, see :func:`full_model_state` and :func:`full_optimizer_state`) and sharded again on
resume (:func:`load_optimizer_state`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module, submodule: str, *, sharded: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``module.<submodule>`` (names relative to the submodule).

    ``sharded`` (``module`` is FSDP2's ``fully_shard`` root): a collective that every rank must
    call; rank 0 gets the full tensors on the CPU, the other ranks an empty dict."""
    if not sharded:
        return module.get_submodule(submodule).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(module, options=_full_options())
    prefix = submodule + "."
    return {name[len(prefix):]: value for name, value in full.items() if name.startswith(prefix)}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with unsharded states, keyed by parameter position as always.

    ``sharded``: a collective every rank must call; rank 0 gets the states on the CPU, the other
    ranks an empty dict.  The gathered, name-keyed dict is re-keyed by position so that the
    checkpoint does not depend on how the run was sharded."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(module, optimizer, options=_full_options())
    if not full:
        return {}
    position: dict[str, int] = {}
    groups = [{**group, "params": [position.setdefault(name, len(position)) for name in group["params"]]}
              for group in full["param_groups"]]
    return {"state": {position[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                         sharded: bool) -> None:
    """Load a position-keyed, unsharded optimizer state (every rank passes the same one); under
    FSDP2 (``sharded``) each rank keeps its own shard of every state tensor."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    keyed = {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(module, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


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
