"""One training step's gradient equals the spec's gradient at its absolute scale, through megatron's schedule,
DDP and ``finalize_model_grads`` (tests/gradient_check.py): DP2, two micro-batches per rank, packed and padded
rows, every objective. fp32 throughout; the two sides differ only in summation order (atol 1e-5 of the
largest gradient element).

The layout tests (test_train_parallel.py) compare losses under Adam with clipping, nearly blind to a gradient
off by a constant factor; this is where a lost ``1/N`` or a stray ``1/DP`` shows.
"""

import pytest

from tests.launch import TINY, launch

pytestmark = pytest.mark.slow

CASES = {
    "bft_v1_packed": ["loss.variant=v1"],
    "bft_v3_padded": ["loss.variant=v3", "data.packing=false"],
    "sft_packed": ["loss.method=sft"],
    "dft_padded": ["loss.method=dft", "data.packing=false"],
}


@pytest.fixture(scope="module")
def checks():
    runs = [{"overrides": TINY + ["parallel.distributed_optimizer=false"] + extra, "grad_check": True}
            for extra in CASES.values()]
    return dict(zip(CASES, (r["grad_check"] for r in launch(2, runs))))


@pytest.mark.parametrize("name", list(CASES))
def test_step_gradient_is_the_reference_gradient(checks, name):
    got = checks[name]
    assert got["micro_batches"] == 2  # global batch 8 = 2 ranks x 2 micro-batches x 2 rows: accumulation too
    assert got["units"] == got["reference_units"] > 0
    assert got["global_units"] > got["units"]  # the other rank's units count in the divisor
    assert got["max_grad"] > 1e-3
    assert got["max_diff"] <= 1e-5 * got["max_grad"], got


@pytest.mark.parametrize("name", list(CASES))
def test_step_statistics_are_the_reference_statistics_over_both_ranks(checks, name):
    """p mean/min/max, s, the short-sample fraction, the token weight and the plain CE, reduced over DP."""
    got, want = checks[name]["metrics"], checks[name]["reference_metrics"]
    assert set(want) <= set(got)
    assert ("p_conf_min" in want) == name.startswith("bft")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
