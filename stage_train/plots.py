"""PNG pictures of training runs and sweeps (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise FileNotFoundError("plots need matplotlib: pip install 'talon[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run} a training run?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run: Path, output: Path | None = None) -> Path:
    records = [r for r in read_metrics(run) if "loss" in r]
    if not records:
        raise ValueError(f"{Path(run) / 'metrics.jsonl'} has no logged steps yet")
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(steps, [r["loss"] for r in records], label="train")
    loss_ax.set(xlabel="step", ylabel="loss (0.8^k-weighted soft CE)", title="loss")
    depth = len(records[0]["step_accuracy"])
    for k in range(depth):
        acc_ax.plot(steps, [r["step_accuracy"][k] for r in records], label=f"TTT step {k}")
    val = [r for r in records if "val_step_accuracy" in r]
    for k in range(depth if val else 0):
        acc_ax.plot([r["step"] for r in val], [r["val_step_accuracy"][k] for r in val], "o--", color=f"C{k}", alpha=0.6)
    acc_ax.set(xlabel="step", ylabel="accuracy (supervised slots)", title="per-step accuracy (dashed: validation)")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output) if output else Path(run) / "training.png"
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_sweep(rows: list[dict], output: Path) -> Path:
    plt = _pyplot()
    done = [r for r in rows if r["status"] == "ok"]
    fig, (tau_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["point"] for r in done]
    tau_ax.barh(names, [r["simulated_acceptance_length"] for r in done])
    tau_ax.set(xlabel="simulated acceptance length (validation)", title="sweep points")
    for r in done:
        acc_ax.plot(range(len(r["step_accuracy"])), r["step_accuracy"], marker="o", label=r["point"])
    acc_ax.set(xlabel="TTT step", ylabel="validation accuracy", title="per-step accuracy")
    acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return Path(output)
