"""Loading a checkpoint into another architecture (single process, no checkpoint files): the comparison of the
model config a checkpoint stores with the config's, its error, warning and skips; and once end to end, through the
trainer's checkpointer on two gloo ranks (tests/train_worker.py reports each rank's ConfigError)."""

import logging

import pytest

from bft_megatron.checkpoint.architecture import architecture_changes, check_architecture
from bft_megatron.config import ConfigError, load_config, to_dict
from tests.data_fixtures import logged
from tests.launch import TINY, launch


def _common(*overrides, tp=1):
    """What a checkpoint written with TINY + ``overrides`` at ``parallel.tp=tp`` holds (common part)."""
    cfg = load_config(None, TINY + list(overrides))
    return {"config": to_dict(cfg), "layout": {"tp": tp, "pp": 1, "vp": None, "cp": 1, "dp": 1, "world": tp},
            "train_state": {"iteration": 2}}


def _cfg(*overrides):
    return load_config(None, TINY + list(overrides))


@pytest.mark.parametrize("finetune", [True, False], ids=["finetune", "resume"])
def test_matching_config_loads(finetune):
    with logged(logging.WARNING) as records:
        check_architecture(_common(), _cfg(), "ckpt", finetune)
        # neither the initialisation scale nor the vocabulary padding (reloaded at any size) is compared
        check_architecture(_common("model.init_method_std=0.5", "model.make_vocab_size_divisible_by=128"), _cfg(),
                           "ckpt", finetune)
    assert records == []


@pytest.mark.parametrize("finetune", [True, False], ids=["finetune", "resume"])
def test_shape_field_mismatch_names_the_field_and_both_values(finetune):
    with pytest.raises(ConfigError) as err:
        check_architecture(_common(), _cfg("model.num_query_groups=4"), "run/iter_0000002", finetune)
    message = str(err.value)
    what = "weights only" if finetune else "iteration 2"
    assert message.startswith(f"loading run/iter_0000002 ({what}): this config's model differs from the checkpoint's")
    assert "model.num_query_groups: checkpoint 2, config 4" in message
    assert "Set these fields to the checkpoint's values" in message


def test_non_shape_fields_are_compared_and_all_differences_listed():
    """Same shapes, another function: RoPE base, norm epsilon, RoPE scaling (a Llama-3.1 recipe on a Llama-3 model)."""
    common = _common()
    cfg = _cfg("model.rope_theta=500000", "model.norm_epsilon=1e-6", "model.rope_scaling.factor=8")
    with pytest.raises(ConfigError) as err:
        check_architecture(common, cfg, "ckpt", finetune=True)
    message = str(err.value)
    assert "model.rope_theta: checkpoint 10000.0, config 500000.0" in message
    assert "model.norm_epsilon: checkpoint 1e-05, config 1e-06" in message
    assert "model.rope_scaling: checkpoint null, config {'factor': 8.0" in message
    errors, _, _ = architecture_changes(common["config"]["model"], to_dict(cfg.model))
    assert len(errors) == 3


def test_import_names_its_hf_directory_as_the_fix():
    common = _common()
    common["config"]["model"]["from_hf"] = "/models/llama3-8b"
    with pytest.raises(ConfigError, match=r"leave them unset: model.from_hf=/models/llama3-8b sets them all"):
        check_architecture(common, _cfg("model.qkv_bias=true"), "ckpt", finetune=True)


def test_null_query_groups_means_one_per_head():
    assert architecture_changes(_common("model.num_query_groups=null")["config"]["model"],
                                to_dict(_cfg("model.num_query_groups=4").model)) == ([], [], [])


def test_max_position_embeddings_is_a_warning_only():
    with logged(logging.WARNING) as records:
        check_architecture(_common(), _cfg("model.max_position_embeddings=128"), "ckpt", finetune=False)
    assert len(records) == 1
    assert "model.max_position_embeddings: checkpoint 64, config 128" in records[0].getMessage()


def test_old_checkpoints_without_the_stored_fields_load():
    """No stored config at all, or a model section older than some fields: those are skipped with an info log."""
    cfg = _cfg("model.rope_theta=500000")
    with logged(logging.INFO) as records:
        check_architecture({"layout": {"tp": 1}}, cfg, "old", finetune=False)
        check_architecture({"config": {"train": {}}}, cfg, "old", finetune=True)
        common = _common()
        for name in ("rope_theta", "rope_scaling", "norm_epsilon"):
            del common["config"]["model"][name]
        check_architecture(common, cfg, "older", finetune=True)
    messages = [r.getMessage() for r in records]
    assert all(r.levelno == logging.INFO for r in records)
    assert sum("stores no model config" in m for m in messages) == 2
    assert "older stores no model.rope_theta, model.rope_scaling, model.norm_epsilon" in messages[-1]
    with pytest.raises(ConfigError, match="model.num_layers: checkpoint 4, config 2"):  # the rest still counts
        check_architecture(common, _cfg("model.num_layers=2"), "older", finetune=True)


@pytest.mark.slow
def test_trainer_refuses_another_architecture_on_every_rank(tmp_path):
    """A shape change used to end in megatron's raw CheckpointingException mid-load, a RoPE/eps change to load and
    train silently; both now fail on both ranks before loading, and matching configs still load."""
    run = str(tmp_path / "run")
    one = TINY + ["train.train_iters=1"]
    results = launch(2, [
        {"overrides": one + [f"checkpoint.save={run}"]},
        {"overrides": one + [f"checkpoint.load={run}/iter_0000001", "checkpoint.finetune=true",
                             "model.num_query_groups=4"]},
        {"overrides": one + [f"checkpoint.load={run}", "model.rope_theta=500000", "model.norm_epsilon=1e-6"]},
        {"overrides": one + [f"checkpoint.load={run}", "checkpoint.finetune=true",
                             "model.max_position_embeddings=128"]},
        {"overrides": one + [f"checkpoint.load={run}"]},
    ])
    shape, rope = results[1], results[2]
    for failed in (shape, rope):
        assert failed["history"] == [] and len(failed["load_errors"]) == 2
        assert failed["load_errors"][0] == failed["load_errors"][1]
    assert shape["load_errors"][0].startswith(f"loading {run}/iter_0000001 (weights only): this config's model")
    assert "model.num_query_groups: checkpoint 2, config 4" in shape["load_errors"][0]
    assert f"loading {run}/iter_0000001 (iteration 1)" in rope["load_errors"][0]
    assert "model.rope_theta: checkpoint 10000.0, config 500000.0" in rope["load_errors"][0]
    assert "model.norm_epsilon: checkpoint 1e-05, config 1e-06" in rope["load_errors"][0]
    finetuned, resumed = results[3], results[4]
    assert "load_errors" not in finetuned and [h["iteration"] for h in finetuned["history"]] == [1]
    assert "load_errors" not in resumed and resumed["iteration"] == 1 and resumed["history"] == []
