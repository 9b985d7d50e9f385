"""Loss statistics as local partials, reduced once per step (never per micro-batch).

Per micro-batch the objective returns *partials* (tensors, no host sync): ``sums`` hold
``[sum, count]`` pairs, ``mins``/``maxs`` hold running extrema. The training loop merges the
partials of all its micro-batches and calls :func:`reduce_metrics` once per optimizer step, which
costs two all-reduces over the data-parallel x context-parallel group and one host synchronisation.

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
        self._add_pair(name, torch.stack((total.detach().double(), count.detach().double())))

    def add_pairs(self, names, flat: torch.Tensor) -> None:
        """``add_sum`` for several names from one float64 ``[2*len(names)]`` tensor of (sum, count) pairs
        (views into it: no kernel per statistic)."""
        for i, name in enumerate(names):
            self._add_pair(name, flat[2 * i:2 * i + 2].detach())

    def _add_pair(self, name: str, pair: torch.Tensor) -> None:
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


def _stack(values: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor | None]:
    keys = sorted(values)
    return keys, (torch.stack([values[k] for k in keys]) if keys else None)


def _all_reduce(tensor: torch.Tensor | None, op, group) -> None:
    if tensor is not None and group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def reduce_metrics(partials: list[MetricPartials] | MetricPartials, group=None) -> dict[str, float]:
    """Merge micro-batch partials and reduce them over ``group`` (normally DP x CP) into floats.

    Means come out under their own name (``sum / count``; NaN when the count is 0), extrema as
    ``<name>_min`` / ``<name>_max`` (absent when no rank saw a value). Every rank of ``group`` must
    call this with partials holding the same keys (the objective always emits the same keys for a
    given method). Two all-reduces (sums; minima with negated maxima) and one device-to-host copy.
    """
    if isinstance(partials, MetricPartials):
        partials = [partials]
    merged = MetricPartials()
    for p in partials:
        merged = merged.merge(p)
    sum_keys, sums = _stack(merged.sums)
    min_keys, mins = _stack(merged.mins)
    max_keys, maxs = _stack(merged.maxs)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    extrema = [t for t in (mins, None if maxs is None else -maxs) if t is not None]
    extrema = torch.cat(extrema) if extrema else None
    _all_reduce(extrema, dist.ReduceOp.MIN, group)
    parts = [t.reshape(-1) for t in (sums, extrema) if t is not None]
    host = torch.cat(parts).tolist() if parts else []   # the one host synchronisation
    out: dict[str, float] = {}
    for i, k in enumerate(sum_keys):
        total, count = host[2 * i], host[2 * i + 1]
        out[k] = total / count if count > 0 else float("nan")
    ext = host[2 * len(sum_keys):]
    named = [(k + "_min", x) for k, x in zip(min_keys, ext)] + [(k + "_max", -x) for k, x in
                                                                zip(max_keys, ext[len(min_keys):])]
    for name, x in named:
        if abs(x) != float("inf"):
            out[name] = x
    return out
