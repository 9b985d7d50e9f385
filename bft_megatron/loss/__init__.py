"""The BFT / DFT / SFT loss in two layers.

* :func:`vocab_parallel_nll` — per-token NLL from vocabulary-sharded logits (TP group as argument);
* :func:`objective` — the objective over per-token NLL and sample boundaries (pure math; optional
  context-parallel gather);
* :func:`sample_statistics` — the same math per sample (``--eval-samples``).

See ``docs/loss.md`` for the semantics (global per-sample mean, packed segments, context parallel).
"""

from bft_megatron.loss.metrics import MetricPartials, reduce_metrics
from bft_megatron.loss.objective import METHODS, VARIANTS, objective
from bft_megatron.loss.samples import sample_statistics
from bft_megatron.loss.vocab_parallel import vocab_parallel_nll

__all__ = ["objective", "sample_statistics", "vocab_parallel_nll", "MetricPartials", "reduce_metrics", "METHODS",
           "VARIANTS"]
