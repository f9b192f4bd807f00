"""`talon sweep`: every point of a grid, trained from the same cache, with a results table.

Points run one after another in this process, so the cache's manifest and pages are warm for
all of them.  A point whose run folder has a summary is finished and skipped; a point that
fails is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, TrainConfig, train_config_from_dict

_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _convert(name: str, text: str) -> Any:
    kind = str(_FIELD_TYPES[name])
    try:
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
        if "bool" in kind:
            return text.lower() in ("1", "true", "yes")
    except ValueError as err:
        raise ConfigError(f"--grid {name}: {text!r} is not a valid {kind}") from err
    return text


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"--grid {spec!r}: expected NAME=V1,V2,...")
        if name not in _FIELD_TYPES or name in ("cache", "out"):
            raise ConfigError(f"--grid {spec!r}: {name!r} is not a train setting")
        grid[name] = [_convert(name, v.strip()) for v in values.split(",") if v.strip()]
    if not grid:
        raise ConfigError("give at least one --grid NAME=V1,V2")
    return grid


def point_name(values: dict[str, Any]) -> str:
    return "_".join(f"{k}={v}" for k, v in values.items())


def _row(name: str, values: dict, summary: dict, status: str, seconds: float) -> dict:
    val = summary.get("validation") or summary.get("final") or {}
    return {
        "point": name, **values, "status": status,
        "step_accuracy": val.get("step_accuracy", []),
        "simulated_acceptance_length": val.get("simulated_acceptance_length"),
        "final_train_loss": (summary.get("final") or {}).get("loss"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "wall_seconds": round(seconds, 1),
        "error": summary.get("error"),
    }


def run_sweep(base: dict[str, Any], grid: dict[str, list[Any]], out: Path) -> list[dict]:
    from stage_train.plots import plot_sweep
    from stage_train.trainer import run_train

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = point_name(values)
        run_dir = out / "points" / name
        summary_path = run_dir / "summary.json"
        started = time.perf_counter()
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            rows.append(_row(name, values, summary, "ok", summary.get("seconds", 0.0)))
            continue
        try:
            cfg = train_config_from_dict({**base, **values, "out": str(run_dir)}, where=f"sweep point {name}")
            summary = run_train(cfg)
            rows.append(_row(name, values, summary, "ok", time.perf_counter() - started))
        except Exception as err:  # a failed point is recorded, the sweep goes on
            (run_dir).mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            rows.append(_row(name, values, {"error": f"{type(err).__name__}: {err}"}, "failed", time.perf_counter() - started))
    write_results(rows, grid, out)
    if any(r["status"] == "ok" for r in rows):
        plot_sweep(rows, out / "results.png")
    return rows


def write_results(rows: list[dict], grid: dict[str, list[Any]], out: Path) -> None:
    depth = max((len(r["step_accuracy"]) for r in rows), default=0)
    columns = ["point", *grid, "status", "simulated_acceptance_length", *[f"val_acc_{k}" for k in range(depth)],
               "final_train_loss", "tokens_per_second", "wall_seconds", "error"]
    flat = []
    for r in rows:
        item = {c: r.get(c) for c in columns}
        for k, acc in enumerate(r["step_accuracy"]):
            item[f"val_acc_{k}"] = acc
        flat.append(item)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(item[c]) for c in columns) + " |" for item in flat]
    (out / "results.md").write_text("\n".join(lines) + "\n")
