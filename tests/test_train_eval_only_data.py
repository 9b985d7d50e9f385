"""``bft-megatron train --eval-only`` on validation data alone (scoring weights on a held-out set): ``data.valid``
sources without ``data.train`` are prepared into ``data.output_dir`` (valid/ alone) and evaluated; with a training
config the training split is neither prepared nor read; a changed ``data.valid`` is refused naming valid/ only, as
the data layer refuses any prepared split that no longer matches its sources, until ``bft-megatron prepare --valid``
rebuilds it. A run that trains on such a config is refused, naming ``data.train``. One process on CPU (the CLI end
to end), TINY model with the bundled sentencepiece tokenizer, the initial weights."""

from __future__ import annotations

import json
import logging

import pytest

from bft_megatron.config import ConfigError
from bft_megatron.config.schema import load_config
from bft_megatron.data import prepare
from bft_megatron.data.storage import PackedDataset
from bft_megatron.training.data import open_datasets
from tests.data_fixtures import CHATS, DEMO_SP, logged, synthetic_chats, write_jsonl
from tests.launch import TINY
from tests.test_train_eval_only import _train

pytestmark = pytest.mark.slow

DATA = [f"data.tokenizer={DEMO_SP}", "data.template=chatml", "model.vocab_size=3000", "data.seq_length=64"]
PREPARE = ["--tokenizer", DEMO_SP, "--template", "chatml", "--seq-length", "64", "--no-progress"]


def test_validation_sources_alone_are_prepared_and_evaluated_but_not_trained_on(tmp_path):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", synthetic_chats(12, seed=5))
    out, metrics = tmp_path / "prepared", tmp_path / "metrics.json"
    config = [*DATA, f"data.valid=[{held_out}]", f"data.output_dir={out}"]
    proc = _train(*config, "--eval-only", "--eval-out", str(metrics))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"preparing valid into {out}" in proc.stderr and not (out / "train").exists()
    result = json.loads(metrics.read_text())
    assert result["validation_rows"] == len(PackedDataset(out / "valid")) and result["metrics"]["lm_loss"] > 0
    # with training sources listed too, an evaluation leaves them unprepared (it prepared train/ first)
    train_src = write_jsonl(tmp_path / "train.jsonl", synthetic_chats(16, seed=3))
    train, valid = open_datasets(load_config(None, [*TINY, *config, f"data.train=[{train_src}]"]), eval_only=True)
    assert train is None and len(valid) == result["validation_rows"] and not (out / "train").exists()
    # data.valid says how valid/ is prepared: every setting is compared, also one at its default (chatml)
    other = tmp_path / "llama3"
    assert prepare.main(["--valid", str(held_out), "--output", str(other), *PREPARE, "--template", "llama3"]) == 0
    with pytest.raises(ConfigError, match="data.template: prepared llama3, configured chatml"):
        open_datasets(load_config(None, [*TINY, *config[:-1], f"data.output_dir={other}"]), eval_only=True)
    # training on it is refused, naming data.train: without data.output_dir before anything (it trained on
    # synthetic data, with a warning), with it on rank 0 before any model exists
    from bft_megatron.training.preflight import load_checked

    with logged(logging.ERROR) as records:
        assert load_checked(None, [*TINY, *config[:-1]], logging.getLogger("bft_megatron.test"), check=False,
                            dry_run=False) is None
    assert "data.train lists no sources (and data.output_dir is empty), but data.valid lists 1" in (
        records[0].getMessage())
    with pytest.raises(ConfigError, match=rf"data.output_dir={out}: no prepared train split .* data.valid's 1 "
                                          r"source\(s\) alone are for evaluation \(bft-megatron train --eval-only\)"):
        open_datasets(load_config(None, [*TINY, *config]))


def test_a_changed_validation_set_is_refused_then_prepared_alone_and_training_sources_are_not_read(tmp_path):
    train_src = write_jsonl(tmp_path / "train.jsonl", synthetic_chats(16, seed=3))
    first, second = (write_jsonl(tmp_path / "v1.jsonl", CHATS), write_jsonl(tmp_path / "v2.jsonl", CHATS[:2]))
    out = tmp_path / "prepared"
    assert prepare.main(["--input", str(train_src), "--valid", str(first), "--output", str(out), *PREPARE]) == 0
    train_arrays = (out / "train" / "tokens.npy").stat().st_mtime_ns
    config = [*DATA, f"data.train=[{train_src}]", f"data.valid=[{second}]", f"data.output_dir={out}"]
    proc = _train(*config, "--eval-only")
    assert proc.returncode == 2
    assert f"{out / 'valid'} was prepared from other data or settings than the config asks for" in proc.stderr
    assert "data.valid[0]" in proc.stderr and f"{out / 'train'} was" not in proc.stderr
    # the way out the message names: rebuild valid/ alone
    assert prepare.main(["--valid", str(second), "--output", str(out), *PREPARE]) == 0
    train_src.unlink()  # an evaluation does not read (nor hash) the training sources
    metrics = tmp_path / "metrics.json"
    proc = _train(*config, "--eval-only", "--eval-out", str(metrics))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(metrics.read_text())["validation_rows"] == len(PackedDataset(out / "valid"))
    assert (out / "train" / "tokens.npy").stat().st_mtime_ns == train_arrays
