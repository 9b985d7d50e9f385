"""``bft-megatron train --eval-only``: one validation of the weights the run would start from; nothing trained or
saved. One process on CPU (the CLI end to end), TINY model, synthetic data (64 validation rows)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from bft_megatron.checkpoint import run_lock
from bft_megatron.config import ConfigError
from bft_megatron.parallel.bootstrap import free_port
from tests.launch import ROOT, TINY

pytestmark = pytest.mark.slow


def _train(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
               MASTER_PORT=str(free_port()))
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                 f"--master-port={free_port()}", "--master-addr=127.0.0.1", "-m"] if nproc > 1
                else [sys.executable, "-m"])
    cmd = [*launcher, "bft_megatron.train", *TINY, "train.train_iters=2", "train.eval_iters=null", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _validation_lines(proc) -> list[tuple[int, float]]:
    """(step, lm loss) of each ``validation at step N`` line."""
    found = re.findall(r"validation at step (\d+) \|.*?lm loss ([\d.]+)", proc.stdout + proc.stderr)
    return [(int(step), float(lm)) for step, lm in found]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run that validates after its last step and saves it."""
    save = tmp_path_factory.mktemp("eval_only") / "run"
    proc = _train("train.eval_interval=2", f"checkpoint.save={save}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save, _validation_lines(proc)


def test_eval_only_validates_the_latest_checkpoint_and_writes_nothing_there(run, tmp_path):
    save, trained = run
    assert [step for step, _ in trained] == [2]
    before = sorted(os.listdir(save))
    out = tmp_path / "metrics.json"
    run_lock.acquire(str(save), logging.getLogger(__name__))  # a training run still holding the directory
    try:
        proc = _train(f"checkpoint.save={save}", "--eval-only", "--eval-out", str(out),
                      f"logging.tensorboard_dir={tmp_path / 'tb'}")
    finally:
        run_lock.release(str(save))
    assert proc.returncode == 0, proc.stderr[-3000:]  # read-only: it neither takes nor needs the run's lock
    result = json.loads(out.read_text())
    assert result["iteration"] == 2 and result["checkpoint"].endswith("iter_0000002")
    assert result["eval_iters"] is None and result["validation_rows"] == 64
    # the same weights and rows as the run's own validation after step 2 (logged with 6 decimals)
    assert result["metrics"]["lm_loss"] == pytest.approx(trained[0][1], abs=2e-6)
    assert _validation_lines(proc) == [(2, pytest.approx(trained[0][1], abs=2e-6))]
    assert sorted(os.listdir(save)) == before  # no checkpoint, no config.yaml rewritten
    assert not (tmp_path / "tb").exists()  # nothing appended to the run's TensorBoard (or W&B) logs
    assert "step 1/" not in proc.stdout + proc.stderr  # no training step


def test_eval_only_on_two_ranks_resharded_exits_0_everywhere(run, tmp_path):
    """DP2 reading the DP1 run's checkpoint (the same rows, another batch split): every rank exits 0 (torchrun fails
    the job otherwise), global rank 0 alone writes the metrics, equal to the one-process run's."""
    save, trained = run
    out = tmp_path / "dp2.json"
    touched = os.stat(save).st_mtime_ns
    # another LR schedule than the run's (an evaluation reads the weights alone: nothing to compare the schedule with)
    proc = _train(f"checkpoint.save={save}", "train.lr=1e-4", "train.warmup_iters=0", "train.train_iters=9",
                  "--eval-only", "--eval-out", str(out), "train.eval_iters=8", nproc=2)  # 8 x 8: every row, in order
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "train.eval_iters=8 x train.global_batch_size=8 = 64 rows of the 64 validation rows" in proc.stderr
    assert os.stat(save).st_mtime_ns == touched  # not even the shared-directory probe of a training job
    result = json.loads(out.read_text())
    assert result["iteration"] == 2 and result["metrics"]["lm_loss"] == pytest.approx(trained[0][1], abs=2e-6)


def test_eval_only_without_a_checkpoint_says_it_evaluates_the_initial_weights(run, tmp_path):
    _, trained = run
    out = tmp_path / "new" / "folder" / "init.json"  # made before the validation runs
    proc = _train("--eval-only", "--eval-out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating the initial weights" in proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["iteration"] == 0 and result["checkpoint"] is None
    assert result["metrics"]["lm_loss"] > trained[0][1]  # two steps at lr 3e-3 lowered it


def test_eval_only_needs_validation_data_and_eval_out_needs_eval_only(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    proc = _train(f"data.train={data}", f"data.output_dir={tmp_path / 'prepared'}", "--eval-only",
                  "data.tokenizer=bft_megatron/data/assets/hpo_sp.model", "data.template=chatml",
                  "model.vocab_size=3000")
    assert proc.returncode == 2
    assert "--eval-only evaluates on validation data, but data.valid is empty" in proc.stderr
    assert not (tmp_path / "prepared").exists()  # refused before any data preparation
    proc = _train("--eval-out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--eval-out needs --eval-only" in proc.stderr
    proc = _train("--check", "--dry-run")  # together, --dry-run skipped --check's checks of the paths
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_eval_only_needs_the_validation_split_the_trainer_opens(tmp_path):
    """The check and the trainer share one predicate (before, a config passed the check and failed after the load):
    validation sources alone are prepared for an evaluation, into data.output_dir (without one the evaluation ran
    on synthetic data); their data config is checked as training sources' are."""
    from bft_megatron.config.schema import load_config
    from bft_megatron.training.preflight import _require_validation_data

    valid = [f"data.valid=[{tmp_path / 'v.jsonl'}]", "data.tokenizer=bft_megatron/data/assets/hpo_sp.model"]
    _require_validation_data(load_config(None, TINY + valid + [f"data.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="--eval-only: data.valid lists 1 source.s. but data.output_dir is empty"):
        _require_validation_data(load_config(None, TINY + valid))
    with pytest.raises(ValueError, match="data config: tokenizer='': must name"):  # as with data.train sources
        _require_validation_data(load_config(None, TINY + valid[:1] + [f"data.output_dir={tmp_path}"]))
    _require_validation_data(load_config(None, TINY))  # synthetic data has validation rows
