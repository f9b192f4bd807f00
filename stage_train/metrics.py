"""Accumulating step metrics on the device and writing them as JSON lines.

Values stay as tensors between log points, so the training step never forces a host sync.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stage_train.core import Eagle3StepMetrics


class MetricWindow:
    """Sums of per-step counts since the last log point."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._loss = None
        self._steps = 0
        self._correct = None
        self._valid = None
        self._prefix_hits = None
        self._prefix_valid = None
        self.tokens = 0

    def add(self, metrics: Eagle3StepMetrics, tokens: int) -> None:
        loss = metrics.loss.detach().float()
        correct = (metrics.step_accuracies * metrics.step_valid_tokens).detach().float()
        valid = metrics.step_valid_tokens.detach().float()
        hits, pvalid = metrics.prefix_hits.detach().float(), metrics.prefix_valid.detach().float()
        if self._loss is None:
            self._loss, self._correct, self._valid, self._prefix_hits, self._prefix_valid = loss, correct, valid, hits, pvalid
        else:
            self._loss = self._loss + loss
            self._correct = self._correct + correct
            self._valid = self._valid + valid
            self._prefix_hits = self._prefix_hits + hits
            self._prefix_valid = self._prefix_valid + pvalid
        self._steps += 1
        self.tokens += tokens

    def summary(self) -> dict:
        """Host-side numbers for the window (the one sync per log interval)."""
        if self._loss is None:
            return {}
        step_acc = (self._correct / self._valid.clamp(min=1)).tolist()
        tau = 1.0 + float((self._prefix_hits / self._prefix_valid.clamp(min=1)).sum())
        return {
            "loss": float(self._loss) / self._steps,
            "step_accuracy": [round(a, 5) for a in step_acc],
            "accuracy": float(self._correct.sum() / self._valid.sum().clamp(min=1)),
            "simulated_acceptance_length": round(tau, 4),
            "valid_tokens": int(self._valid.sum()),
        }


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
