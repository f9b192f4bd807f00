"""Accumulating step metrics on the device, reducing them across ranks, and writing them out.

The counts of a log window live in one flat tensor on the device, so the training step never
forces a host sync and a single all-reduce makes the numbers global.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stage_train.core import Eagle3StepMetrics


class MetricWindow:
    """Sums since the last log point: [loss, micro-steps, tokens, correct[K], valid[K],
    prefix_hits[K], prefix_valid[K]]."""

    def __init__(self, ttt_steps: int, device: torch.device):
        self.k = ttt_steps
        self.sums = torch.zeros(3 + 4 * ttt_steps, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.sums.zero_()

    def add(self, metrics: Eagle3StepMetrics, tokens: int) -> None:
        k = self.k
        valid = metrics.step_valid_tokens.detach().to(self.sums)
        update = torch.cat([
            metrics.loss.detach().to(self.sums).reshape(1),
            torch.ones(1, dtype=self.sums.dtype, device=self.sums.device),
            torch.full((1,), float(tokens), dtype=self.sums.dtype, device=self.sums.device),
            metrics.step_accuracies.detach().to(self.sums) * valid,
            valid,
            metrics.prefix_hits.detach().to(self.sums),
            metrics.prefix_valid.detach().to(self.sums),
        ])
        assert update.numel() == 3 + 4 * k
        self.sums += update

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"].to(self.sums))

    def summary(self, runtime=None) -> dict:
        """Host-side numbers for the window, summed over ranks (the one sync per log interval)."""
        sums = self.sums.clone()
        if runtime is not None:
            runtime.all_reduce_sum(sums)
        sums = sums.cpu()
        k = self.k
        loss, micro, tokens = float(sums[0]), float(sums[1]), float(sums[2])
        correct, valid = sums[3 : 3 + k], sums[3 + k : 3 + 2 * k]
        hits, pvalid = sums[3 + 2 * k : 3 + 3 * k], sums[3 + 3 * k : 3 + 4 * k]
        if micro == 0:
            return {}
        return {
            "loss": loss / micro,
            "step_accuracy": [round(float(a), 5) for a in correct / valid.clamp(min=1)],
            "accuracy": float(correct.sum() / valid.sum().clamp(min=1)),
            "simulated_acceptance_length": round(1.0 + float((hits / pvalid.clamp(min=1)).sum()), 4),
            "valid_tokens": int(valid.sum()),
            "tokens": int(tokens),
        }


class MetricSink:
    """metrics.jsonl always; TensorBoard scalars too when tensorboard is installed."""

    def __init__(self, run_dir: Path, *, keep_until_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if keep_until_step is not None and self.path.is_file():
            lines = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= keep_until_step]
        self.path.write_text("".join(l + "\n" for l in lines))
        self._handle = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional
            self._tensorboard = None

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._tensorboard is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for depth, item in enumerate(value):
                        self._tensorboard.add_scalar(f"{key}/{depth}", item, step)

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
