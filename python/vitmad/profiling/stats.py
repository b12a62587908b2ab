"""Running float64 statistics of per-image MAD over an image set, mergeable across processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RunningStats"]


@dataclass
class RunningStats:
    """Sum, sum of squares, min, max and count of per-image MAD, per layer and head.

    Sums are float64 so that a resumed or sharded run adds up to the uninterrupted single-process result.

    Attributes:
        total, total_sq, low, high: ``[L, H]`` float64.
        count: images seen.
    """

    total: torch.Tensor
    total_sq: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    count: int = 0

    @staticmethod
    def empty(num_layers: int, num_heads: int) -> RunningStats:
        shape = (num_layers, num_heads)
        return RunningStats(
            torch.zeros(shape, dtype=torch.float64),
            torch.zeros(shape, dtype=torch.float64),
            torch.full(shape, float("inf"), dtype=torch.float64),
            torch.full(shape, float("-inf"), dtype=torch.float64),
        )

    def add(self, mad: torch.Tensor) -> RunningStats:
        """The statistics with a batch added (a new object: an interrupt never leaves half an update).

        Args:
            mad: ``[L, B, H]`` MAD of ``B`` images.
        """
        batch = mad.detach().to("cpu", torch.float64)
        return RunningStats(
            self.total + batch.sum(1),
            self.total_sq + batch.square().sum(1),
            torch.minimum(self.low, batch.amin(1)),
            torch.maximum(self.high, batch.amax(1)),
            self.count + batch.shape[1],
        )

    @property
    def mean(self) -> torch.Tensor:
        """``[L, H]`` mean over images."""
        return self.total / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        """``[L, H]`` population standard deviation over images."""
        mean = self.mean
        return (self.total_sq / max(self.count, 1) - mean.square()).clamp_min(0).sqrt()

    def rows(self, layers: slice) -> RunningStats:
        """The statistics of some layers (rows)."""
        return RunningStats(self.total[layers], self.total_sq[layers], self.low[layers], self.high[layers],
                            self.count)

    def state_dict(self) -> dict:
        return {"total": self.total, "total_sq": self.total_sq, "low": self.low, "high": self.high,
                "count": self.count}

    @staticmethod
    def from_state_dict(state: dict) -> RunningStats:
        return RunningStats(state["total"], state["total_sq"], state["low"], state["high"], int(state["count"]))
