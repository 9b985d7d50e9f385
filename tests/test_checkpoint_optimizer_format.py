"""``checkpoint.optimizer_format=dp_reshardable`` on gloo processes (CPU, torch Adam).

megatron's ``dp_reshardable`` format writes each DP rank's flat optimizer buffers without the host-side gather of
``fully_reshardable`` (65-73% of a save on an H200, docs/benchmarks.md). With torch Adam on megatron-core 0.16 its
load silently reset Adam's per-parameter ``step`` to the request's (0: the bias correction restarts, the run
diverges) and failed on fp32 main parameters; ``tolerate_missing_adam_step`` handles both. Checked here:

* a DP2 resume is bitwise equal to the uninterrupted run: fp32 and bf16, sync and async saves, and with four
  processes under PP2 x VP2 and TP2 x SP. A save takes the format from the config, a load from the checkpoint's
  config (the resumes here leave the config at the default format);
* a DP2 checkpoint resumes at DP1 (within fp32 round-off);
* a full resume at another TP fails on every rank before loading, naming the format and the change; a weights-only
  load (``finetune``) at that TP works; ``train --check`` and the pre-flight of every run (``check_paths``) say so
  before any model is built, for ``checkpoint.load`` and for the run's own ``checkpoint.save``.
"""

import pytest

from tests.launch import TINY, launch

pytestmark = pytest.mark.slow

DP_FORMAT = "checkpoint.optimizer_format=dp_reshardable"
BF16 = TINY + ["train.bf16=true"]
PP_VP = ["parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1"]
TP_SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_format")
    fp32, bf16 = f"{root}/fp32", f"{root}/bf16"
    two = launch(2, [
        {"overrides": TINY + [DP_FORMAT, f"checkpoint.save={fp32}", "checkpoint.save_interval=2"]},
        {"overrides": TINY + [f"checkpoint.load={fp32}/iter_0000002"]},  # the config's format is the default
        {"overrides": BF16 + [DP_FORMAT, f"checkpoint.save={bf16}", "checkpoint.save_interval=2"]},
        {"overrides": BF16 + [DP_FORMAT, f"checkpoint.load={bf16}/iter_0000002"]},
        {"overrides": TINY + ["parallel.tp=2", f"checkpoint.load={fp32}/iter_0000002"]},
        {"overrides": TINY + ["parallel.tp=2", f"checkpoint.load={fp32}/iter_0000002", "checkpoint.finetune=true"]},
        {"overrides": BF16 + [DP_FORMAT, f"checkpoint.save={root}/async", "checkpoint.save_interval=2",
                              "checkpoint.async_save=true"]},
        {"overrides": BF16 + [f"checkpoint.load={root}/async/iter_0000002"]},
    ])
    one = launch(1, [{"overrides": TINY + [f"checkpoint.load={fp32}/iter_0000002"]}])
    four = launch(4, [  # PP2 x VP2 x DP2 and TP2 x SP x DP2: the optimizer shards of model-parallel ranks
        {"overrides": BF16 + PP_VP + [DP_FORMAT, f"checkpoint.save={root}/pp", "checkpoint.save_interval=2"]},
        {"overrides": BF16 + PP_VP + [f"checkpoint.load={root}/pp/iter_0000002"]},
        {"overrides": BF16 + TP_SP + [DP_FORMAT, f"checkpoint.save={root}/tp", "checkpoint.save_interval=2"]},
        {"overrides": BF16 + TP_SP + [f"checkpoint.load={root}/tp/iter_0000002"]},
    ])
    return two + one + four, fp32  # runs[8]: the DP1 resume; runs[9:13]: four processes


@pytest.fixture(scope="module")
def runs(saved):
    return saved[0]


def _losses(run) -> list[float]:
    assert run.get("error") is None and not run.get("load_errors"), run
    return [h["loss"] for h in run["history"]]


@pytest.mark.parametrize("full, resumed", [(0, 1), (2, 3), (6, 7), (9, 10), (11, 12)],
                         ids=["fp32", "bf16", "bf16-async", "bf16-pp2-vp2-dp2", "bf16-tp2-sp-dp2"])
def test_dp2_resume_is_bitwise(runs, full, resumed):
    assert [h["iteration"] for h in runs[resumed]["history"]] == [3, 4]
    assert _losses(runs[resumed]) == _losses(runs[full])[2:]


def test_dp2_checkpoint_resumes_at_dp1(runs):
    assert [h["iteration"] for h in runs[8]["history"]] == [3, 4]
    assert _losses(runs[8]) == pytest.approx(_losses(runs[0])[2:], rel=1e-5)


def test_full_resume_at_another_tp_fails_naming_the_format(runs):
    errors = runs[4]["load_errors"]
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert "dp_reshardable format (checkpoint.optimizer_format)" in errors[0] and "tp 1 -> 2" in errors[0]
    assert "checkpoint.finetune=true" in errors[0]
    assert runs[4]["history"] == []
    finetuned = runs[5]
    assert [h["iteration"] for h in finetuned["history"]] == [1, 2, 3, 4] and finetuned["error"] is None


def test_preflight_refuses_the_resume_at_another_tp_before_any_model_exists(saved, tmp_path):
    from bft_megatron.config import check_paths
    from bft_megatron.config.base import ConfigError
    from bft_megatron.config.schema import load_config

    fp32 = saved[1]
    fresh = f"checkpoint.save={tmp_path}/new"
    for where in ([f"checkpoint.load={fp32}/iter_0000002", fresh], [f"checkpoint.load={fp32}", fresh],
                  [f"checkpoint.save={fp32}"]):  # the run's own save directory wins over checkpoint.load
        with pytest.raises(ConfigError, match=r"dp_reshardable format \(checkpoint.optimizer_format\).*tp 1 -> 2"):
            check_paths(load_config(None, TINY + ["parallel.tp=2"] + where), data=False)
        check_paths(load_config(None, TINY + where), data=False)  # the saved layout: fine
    check_paths(load_config(None, TINY + ["parallel.tp=2", "checkpoint.finetune=true", fresh,
                                          f"checkpoint.load={fp32}"]), data=False)  # weights only: any layout
