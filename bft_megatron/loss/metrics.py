"""Loss statistics as local partials, reduced once per step (never per micro-batch).

Per micro-batch the objective returns *partials* (tensors, no host sync): ``sums`` hold
``[sum, count]`` pairs, ``mins``/``maxs`` hold running extrema. The training loop merges the
partials of all its micro-batches and calls :func:`reduce_metrics` once per optimizer step, which
costs three all-reduces over the data-parallel x context-parallel group.

Which group: per-sample statistics are counted on context-parallel rank 0 only (every CP rank holds
the same per-sample values), token statistics on every CP rank for its own tokens; so one reduction
over DP x CP is right for both. Tensor-parallel ranks hold identical values and are never reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["MetricPartials", "reduce_metrics"]


@dataclass
class MetricPartials:
    """Local partial statistics. ``sums[k]`` is a float64 ``[2]`` tensor ``(sum, count)``."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    mins: dict[str, torch.Tensor] = field(default_factory=dict)
    maxs: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_sum(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        pair = torch.stack((total.detach().double(), count.detach().double()))
        self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def add_min(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().double()
        self.mins[name] = torch.minimum(self.mins[name], v) if name in self.mins else v

    def add_max(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().double()
        self.maxs[name] = torch.maximum(self.maxs[name], v) if name in self.maxs else v

    def merge(self, other: "MetricPartials") -> "MetricPartials":
        """Return a new partial holding both (micro-batch accumulation; still no host sync)."""
        out = MetricPartials(dict(self.sums), dict(self.mins), dict(self.maxs))
        for k, v in other.sums.items():
            out.sums[k] = out.sums[k] + v if k in out.sums else v
        for k, v in other.mins.items():
            out.add_min(k, v)
        for k, v in other.maxs.items():
            out.add_max(k, v)
        return out


def _reduce_stacked(values: dict[str, torch.Tensor], op, group) -> dict[str, torch.Tensor]:
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k] for k in keys])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, op=op, group=group)
    return dict(zip(keys, stacked.unbind(0)))


def reduce_metrics(partials: list[MetricPartials] | MetricPartials, group=None) -> dict[str, float]:
    """Merge micro-batch partials and reduce them over ``group`` (normally DP x CP) into floats.

    Means come out under their own name (``sum / count``; NaN when the count is 0), extrema as
    ``<name>_min`` / ``<name>_max`` (absent when no rank saw a value). Every rank of ``group`` must
    call this with partials holding the same keys (the objective always emits the same keys for a
    given method).
    """
    if isinstance(partials, MetricPartials):
        partials = [partials]
    merged = MetricPartials()
    for p in partials:
        merged = merged.merge(p)
    out: dict[str, float] = {}
    for k, pair in _reduce_stacked(merged.sums, dist.ReduceOp.SUM, group).items():
        total, count = pair.tolist()
        out[k] = total / count if count > 0 else float("nan")
    for suffix, values, op in (("_min", merged.mins, dist.ReduceOp.MIN), ("_max", merged.maxs, dist.ReduceOp.MAX)):
        for k, v in _reduce_stacked(values, op, group).items():
            x = v.item()
            if abs(x) != float("inf"):
                out[k + suffix] = x
    return out
