"""The learning-rate schedule the trainer builds (``training/setup.py::build_scheduler``, megatron's
``OptimizerParamScheduler``) against closed-form references, per decay style; the WSD settings' validation and
their comparison on resume (megatron's scheduler state leaves them out)."""

import math
from types import SimpleNamespace

import pytest

from bft_megatron.checkpoint.schedule import adam_changes, check_schedule
from bft_megatron.config import ConfigError, load_config, to_dict, validate
from bft_megatron.training.setup import build_scheduler
from tests.launch import TINY

_LONG = ["train.train_iters=20", "train.warmup_iters=4", "train.lr=1e-3", "train.min_lr=1e-4"]


def _reference_lr(step: int, decay: str, lr=1e-3, min_lr=1e-4, warmup=4, decay_iters=20, wsd_iters=None,
                  wsd_style="exponential") -> float:
    """lr after ``step`` optimizer steps: linear warmup from 0, then the decay style to ``min_lr`` at decay_iters."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if decay == "constant":
        return lr
    if step > decay_iters:
        return min_lr
    if decay == "wsd":
        start = decay_iters - wsd_iters
        if step <= start:
            return lr
        r = (step - start) / wsd_iters
        coeff = {"linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1), "exponential": 2 * 0.5 ** r - 1,
                 "minus_sqrt": 1 - math.sqrt(r)}[wsd_style]
    else:
        r = (step - warmup) / (decay_iters - warmup)
        coeff = 1 - r if decay == "linear" else 0.5 * (math.cos(math.pi * r) + 1)
    return min_lr + coeff * (lr - min_lr)


def _lrs(*overrides, steps=24):
    cfg = load_config(None, TINY + _LONG + list(overrides))
    validate(cfg, 1, require_te=False)
    group = {"max_lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "wd_mult": 1.0, "lr_mult": 1.0}
    scheduler = build_scheduler(SimpleNamespace(param_groups=[group]), cfg)
    out = []
    for _ in range(steps):
        scheduler.step(1)
        out.append(group["lr"])
    return out


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_plain_decay_styles_follow_the_reference(decay):
    assert _lrs(f"train.decay={decay}") == pytest.approx([_reference_lr(s, decay) for s in range(1, 25)],
                                                         rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd_holds_lr_then_anneals_over_the_last_wsd_decay_iters(style):
    lrs = _lrs("train.decay=wsd", "train.wsd_decay_iters=6", f"train.wsd_decay_style={style}")
    want = [_reference_lr(s, "wsd", wsd_iters=6, wsd_style=style) for s in range(1, 25)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lrs[4:14] == [1e-3] * 10  # stable phase: steps 5..14
    assert lrs[14] < 1e-3 and lrs[19] == pytest.approx(1e-4) and lrs[23] == pytest.approx(1e-4)


def test_wsd_default_style_is_megatrons_exponential_and_decay_iters_moves_the_anneal():
    cfg = load_config(None, TINY + _LONG + ["train.decay=wsd", "train.wsd_decay_iters=3"])
    assert cfg.train.wsd_decay_style == "exponential"
    lrs = _lrs("train.decay=wsd", "train.wsd_decay_iters=3", "train.decay_iters=12")
    assert lrs == pytest.approx([_reference_lr(s, "wsd", decay_iters=12, wsd_iters=3) for s in range(1, 25)])
    assert lrs[8] == 1e-3 and lrs[9] < 1e-3 and lrs[12:] == [pytest.approx(1e-4)] * 12


@pytest.mark.parametrize("overrides, message", [
    (["train.decay=wsd"], r"train.decay=wsd needs train.wsd_decay_iters in \[1, 16\].*got null"),
    (["train.decay=wsd", "train.wsd_decay_iters=0"], r"wsd_decay_iters in \[1, 16\].*got 0"),
    (["train.decay=wsd", "train.wsd_decay_iters=17"], r"wsd_decay_iters in \[1, 16\].*got 17"),
    (["train.decay=wsd", "train.decay_iters=10", "train.wsd_decay_iters=7"], r"wsd_decay_iters in \[1, 6\].*got 7"),
    (["train.wsd_decay_iters=5"], r"train.wsd_decay_iters=5 is only used with train.decay=wsd \(got train.decay="
                                  r"cosine\)"),
    (["train.decay=wsd", "train.wsd_decay_iters=5", "train.wsd_decay_style=step"], r"wsd_decay_style"),
])
def test_wsd_config_errors_name_the_field_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, TINY + _LONG + overrides), 1, require_te=False)


def _common(cfg, steps=8):
    group = {"max_lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "wd_mult": 1.0}
    scheduler = build_scheduler(SimpleNamespace(param_groups=[group]), cfg)
    scheduler.step(steps)
    return {"scheduler": scheduler.state_dict(), "config": to_dict(cfg), "train_state": {"iteration": steps}}


def test_a_resume_with_other_wsd_settings_is_named_although_megatrons_state_omits_them():
    wsd = ["train.decay=wsd", "train.wsd_decay_iters=6"]
    saved = load_config(None, TINY + _LONG + wsd)
    common = _common(saved)
    for change, line in ((["train.wsd_decay_iters=4"], "train.wsd_decay_iters: checkpoint 6, config 4 (the WSD "
                                                         "anneal)"),
                         (["train.wsd_decay_style=linear"], "train.wsd_decay_style: checkpoint exponential, config "
                                                            "linear (the WSD anneal)")):
        cfg = load_config(None, TINY + _LONG + wsd + change)
        group = {"max_lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "wd_mult": 1.0}
        scheduler = build_scheduler(SimpleNamespace(param_groups=[group]), cfg)
        assert scheduler.state_dict() == build_scheduler(SimpleNamespace(param_groups=[dict(group)]),
                                                         saved).state_dict()  # megatron cannot tell
        with pytest.raises(ConfigError, match=re_escape(line)):
            check_schedule(scheduler, common, cfg, "ckpt")
    same = load_config(None, TINY + _LONG + wsd)
    check_schedule(build_scheduler(SimpleNamespace(param_groups=[{"max_lr": 1e-3, "min_lr": 1e-4}]), same),
                   common, same, "ckpt")
    # a checkpoint from before these fields existed has nothing to compare; cosine runs ignore them
    old = {k: v for k, v in common["config"]["train"].items() if not k.startswith("wsd_")}
    assert adam_changes({"train": old}, to_dict(load_config(None, TINY + _LONG + wsd + ["train.wsd_decay_iters=4"]))) \
        == []
    cosine = to_dict(load_config(None, TINY + _LONG))
    assert adam_changes({"train": {**cosine["train"], "wsd_decay_style": "linear"}}, cosine) == []


def test_a_resume_from_cosine_to_wsd_names_the_decay_style():
    common = _common(load_config(None, TINY + _LONG))
    cfg = load_config(None, TINY + _LONG + ["train.decay=wsd", "train.wsd_decay_iters=6"])
    scheduler = build_scheduler(SimpleNamespace(param_groups=[{"max_lr": 1e-3, "min_lr": 1e-4}]), cfg)
    with pytest.raises(ConfigError, match=r"train.decay: checkpoint cosine, config wsd \(scheduler lr_decay_style "
                                          r"cosine -> WSD\)"):
        check_schedule(scheduler, common, cfg, "ckpt")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
