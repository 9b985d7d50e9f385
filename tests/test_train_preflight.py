"""The train CLI's pre-flight (``training/preflight.py``): ``--check`` / ``--dry-run`` / real runs, the input
paths each checks (``config.check_paths``) and the hints its config errors carry."""

import os

import pytest

from bft_megatron.config import ConfigError, load_config, validate
from tests.data_fixtures import checkpoint_common, megatron_marker


def test_train_cli_check_and_config_errors():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "bft_megatron.cli", "train", "--config", "configs/demo_cpu.yaml",
                         "--dry-run"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "layout: 1 GPUs = TP1 x PP1" in ok.stdout
    import torch

    # On a machine without CUDA (a login node, CI) the plan says its figures are the GPUs'.
    assert ("note: no CUDA device here: the figures above are for the GPUs" in ok.stdout) != torch.cuda.is_available()
    bad = subprocess.run([sys.executable, "-m", "bft_megatron.train", "--config", "configs/demo_cpu.yaml",
                          "parallel.tp=3", "--check"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "world size 1 is not divisible by parallel.tp*pp*cp" in bad.stderr
    assert "set WORLD_SIZE=N" in bad.stderr  # outside torchrun: how to check for N processes


def test_config_errors_hint_at_the_command_line_fix(monkeypatch):
    """No --config: a missing model field points at the recipes; outside torchrun a world-size error says how to
    check for N processes; otherwise nothing is added."""
    from bft_megatron.config.validate import error_hint

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "no --config was given: start from a recipe" in error_hint("model.hidden_size must be > 0, got 0", None)
    assert error_hint("model.hidden_size must be > 0, got 0", "configs/x.yaml") == ""
    assert error_hint("train.lr must be > 0, got 0", None) == ""  # not a model field: a recipe is no answer
    assert error_hint("model.from_hf: /m/config.json does not exist", None) == ""  # from_hf was given
    assert "set WORLD_SIZE=N" in error_hint("world size 1 is not divisible by parallel.tp*pp*cp", "c.yaml")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert error_hint("world size 8 is not divisible by parallel.tp*pp*cp", "c.yaml") == ""


def test_missing_finetune_checkpoint_is_caught_by_check_but_not_by_dry_run(tmp_path):
    """Recipes carry placeholder paths: --dry-run/plan must still plan them; --check and real runs must not
    start a fine-tune from nothing."""
    from bft_megatron.config import check_paths
    from bft_megatron.train import main

    # a fresh checkpoint.save: the demo's own (runs/demo_cpu/ckpt, made by the README's set-up) would be resumed
    fresh = f"checkpoint.save={tmp_path}/new_run"
    over = ["checkpoint.finetune=true", "checkpoint.load=no/such/ckpt", fresh]
    cfg = load_config("configs/demo_cpu.yaml", over)
    validate(cfg, 1)
    with pytest.raises(ConfigError, match=r"checkpoint.load=no/such/ckpt does not exist \(checkpoint.finetune=true"):
        check_paths(cfg)
    empty = ["checkpoint.finetune=true", f"checkpoint.load={tmp_path}", fresh]
    with pytest.raises(ConfigError, match=r"no complete checkpoint there \(no 'latest' pointer and not an iter_"):
        check_paths(load_config("configs/demo_cpu.yaml", empty))  # e.g. the HF folder instead of the import
    (tmp_path / "config.json").write_text("{}")  # it is the HF folder: say how to import it
    with pytest.raises(ConfigError, match=r"holds an HF config.json: import the model first \(bft-megatron convert "):
        check_paths(load_config("configs/demo_cpu.yaml", empty))
    (tmp_path / "iter_0000003").mkdir()  # an iter_ directory that holds nothing (a save that never finished)
    finetune3 = ["checkpoint.finetune=true", f"checkpoint.load={tmp_path}/iter_0000003", fresh]
    with pytest.raises(ConfigError, match=r"iter_0000003 holds no megatron checkpoint"):
        check_paths(load_config("configs/demo_cpu.yaml", finetune3))
    megatron_marker(str(tmp_path / "iter_0000003"))
    check_paths(load_config("configs/demo_cpu.yaml", finetune3))
    assert main(["--config", "configs/demo_cpu.yaml", *over, "--check"]) == 2
    megatron_marker(str(tmp_path / "iter_0000010"), checkpoint_common(load_config("configs/demo_cpu.yaml", over)))
    (tmp_path / "latest").write_text("iter_0000010\n")  # a restart resumes checkpoint.save's own run instead
    check_paths(load_config("configs/demo_cpu.yaml", over + [f"checkpoint.save={tmp_path}"]))
    assert main(["--config", "configs/demo_cpu.yaml", *over, "--dry-run"]) == 0


def test_a_missing_resume_checkpoint_is_an_error_unless_it_is_the_runs_own_save_dir(tmp_path):
    """A typo in checkpoint.load must not quietly train from scratch; Megatron-LM's `--load X --save X` on a
    first run (nothing saved yet) is fine."""
    from bft_megatron.config import check_paths

    with pytest.raises(ConfigError, match=r"checkpoint.load=no/such/run does not exist \(a full resume reads it; "
                                          r"unset checkpoint.load to train from scratch\)"):
        check_paths(load_config("configs/demo_cpu.yaml", ["checkpoint.load=no/such/run",
                                                          f"checkpoint.save={tmp_path}/new_run"]))  # see above
    own = str(tmp_path / "run")
    check_paths(load_config("configs/demo_cpu.yaml", [f"checkpoint.load={own}", f"checkpoint.save={own}/"]))
    with pytest.raises(ConfigError, match=r"does not exist \(checkpoint.finetune=true starts from it"):
        check_paths(load_config("configs/demo_cpu.yaml", [f"checkpoint.load={own}", f"checkpoint.save={own}",
                                                          "checkpoint.finetune=true"]))  # nothing to fine-tune


def test_a_checkpoint_save_that_is_a_file_is_refused_before_training(tmp_path):
    """It passed --check and the run trained to its first save, then died with NotADirectoryError."""
    from bft_megatron.config import check_paths
    from bft_megatron.train import main

    (tmp_path / "ckpt").write_text("x")
    over = [f"checkpoint.save={tmp_path / 'ckpt'}"]
    with pytest.raises(ConfigError, match=r"checkpoint.save=.*ckpt exists and is not a directory"):
        check_paths(load_config("configs/demo_cpu.yaml", over), data=False)  # real runs check this much
    assert main(["--config", "configs/demo_cpu.yaml", *over, "--check"]) == 2
    with pytest.raises(ConfigError, match=r"logging.tensorboard_dir=.*ckpt exists and is not a directory"):
        check_paths(load_config("configs/demo_cpu.yaml", [f"logging.tensorboard_dir={tmp_path / 'ckpt'}"]), data=False)
    inside = tmp_path / "ckpt" / "run" / "a"  # makedirs would fail on the file above it just the same
    with pytest.raises(ConfigError, match=rf"checkpoint.save={inside}: {tmp_path / 'ckpt'} exists and is not a dir"):
        check_paths(load_config("configs/demo_cpu.yaml", [f"checkpoint.save={inside}"]), data=False)
    check_paths(load_config("configs/demo_cpu.yaml", [f"checkpoint.save={tmp_path / 'new' / 'run'}",
                                                      "logging.tensorboard_dir=relative/tb"]), data=False)


def test_file_in_the_way_names_the_path_as_given_or_the_file_above_it(tmp_path, monkeypatch):
    from bft_megatron.utils.files import file_in_the_way as _file_in_the_way

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert _file_in_the_way("f") == "f" and _file_in_the_way(str(tmp_path / "f")) == str(tmp_path / "f")
    assert _file_in_the_way("f/a/b") == str(tmp_path / "f")  # the file above, as an absolute path
    assert [_file_in_the_way(p) for p in (None, "", "d", "d/new/x", "new")] == [None] * 5


def test_real_runs_leave_the_data_paths_to_rank_0():
    """Every rank checks the checkpoint (shared storage) before the rendezvous, but not the data sources: they
    may exist on global rank 0's node only, which prepares them (a failure there ends every rank with exit 2)."""
    from bft_megatron.config import check_paths

    cfg = load_config("configs/demo_cpu.yaml", ["data.train=[only/on/node0.jsonl]"])
    check_paths(cfg, data=False)
    with pytest.raises(ConfigError, match=r"data.train\[0\].path=only/on/node0.jsonl: no such file"):
        check_paths(cfg)  # --check, on the first node


@pytest.mark.parametrize("override, message", [
    ("data.train=[nope/train.jsonl]", r"data.train\[0\].path=nope/train.jsonl: no such file or directory"),
    ("data.valid=[bft_megatron/data/assets/hpo_train.jsonl,missing.parquet:0.5]",
     r"data.valid\[1\].path=missing.parquet: no such file or directory .*relative paths are taken from "),
    ("data.train=[bft_megatron]",
     r"data.train\[0\].path=bft_megatron: no data files in directory \(supported: \.jsonl, \.json, "),
    ("data.tokenizer=/nope/tok", r"data.tokenizer='/nope/tok': no such file or directory; expected an HF tokenizer"),
    ("data.tokenizer=configs/demo_cpu.yaml", r"data.tokenizer='configs/demo_cpu.yaml': expected an HF tokenizer "
                                             r"directory or a sentencepiece .model file, got a .yaml file"),
])
def test_check_paths_finds_missing_data_sources_and_tokenizer(override, message):
    """--check (the SLURM pre-flight) and real runs; not --dry-run/plan, whose recipes carry placeholders."""
    from bft_megatron.config import check_paths
    from bft_megatron.train import main

    cfg = load_config("configs/demo_cpu.yaml", [override])
    validate(cfg, 1)
    with pytest.raises(ConfigError, match=message):
        check_paths(cfg)
    assert main(["--config", "configs/demo_cpu.yaml", override, "--check"]) == 2
    assert main(["--config", "configs/demo_cpu.yaml", override, "--dry-run"]) == 0


def test_check_paths_leaves_hub_names_to_the_data_layer_and_wants_prepared_data(tmp_path):
    from bft_megatron.config import check_paths

    check_paths(load_config("configs/demo_cpu.yaml"))
    check_paths(load_config("configs/demo_cpu.yaml", ["data.train=[tatsu-lab/alpaca,ultrachat]"]))  # hub ids
    only_dir = load_config("configs/demo_cpu.yaml", ["data.train=null", "data.valid=null",
                                                     f"data.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"data.output_dir={tmp_path}: no prepared train split"):
        check_paths(only_dir)


def test_train_cli_reports_data_config_errors_without_a_traceback():
    from bft_megatron.train import main

    assert main(["--config", "configs/demo_cpu.yaml", "data.template=llama", "--check"]) == 2


class _Log:
    """The logger ``load_checked`` is given: its records, formatted."""

    def __init__(self):
        self.records: list[tuple[str, str]] = []

    def error(self, fmt, *args):
        self.records.append(("error", fmt % args))

    def warning(self, fmt, *args):
        self.records.append(("warning", fmt % args))


def test_load_checked_takes_world_size_and_rank_from_the_environment(monkeypatch, tmp_path):
    """The layout is checked for WORLD_SIZE processes; only global rank 0 logs the config warnings (and takes
    checkpoint.save's run lock); a real run (neither --check nor --dry-run) does not look for the data sources; a
    config error names no recipe when --config was given."""
    from bft_megatron.checkpoint import run_lock
    from bft_megatron.training.preflight import load_checked, release_save_dir

    over = ["parallel.tp=2", "data.train=[only/on/node0.jsonl]", "data.seq_length=512",  # > max_position_embeddings
            f"checkpoint.save={tmp_path}/run"]  # not the README demo's: the lock would be held there
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    log = _Log()
    cfg, layout = load_checked("configs/demo_cpu.yaml", over, log, check=False, dry_run=False)
    assert (layout.world_size, layout.dp, cfg.parallel.tp) == (2, 1, 2) and log.records == []
    assert run_lock.probe(str(tmp_path / "run")) is None and not (tmp_path / "run").exists()  # not rank 0: no lock
    monkeypatch.setenv("RANK", "0")
    cfg, _ = load_checked("configs/demo_cpu.yaml", over, log, check=False, dry_run=False)
    assert os.path.realpath(tmp_path / "run") in run_lock._HELD
    release_save_dir(cfg)
    assert os.path.realpath(tmp_path / "run") not in run_lock._HELD
    [(level, message)] = log.records
    assert level == "warning" and message.startswith("config: data.seq_length=512 exceeds")
    log.records.clear()
    assert load_checked("configs/demo_cpu.yaml", over, log, check=True, dry_run=False) is None
    [(level, message)] = log.records
    assert level == "error" and "data.train[0].path=only/on/node0.jsonl: no such file" in message
    log.records.clear()
    assert load_checked("configs/demo_cpu.yaml", ["model.hidden_size=0"], log, check=False, dry_run=True) is None
    [(level, message)] = log.records
    assert message == "config error: model.hidden_size must be > 0, got 0 (set it or use model.from_hf)"


def test_check_reports_a_prepared_split_with_a_missing_array_as_a_config_error(tmp_path):
    """``--check`` opens the prepared splits: a deleted array file is a FileNotFoundError, reported as a config
    error (exit 2) rather than a traceback."""
    from bft_megatron.training.data import open_datasets
    from bft_megatron.training.preflight import load_checked
    from tests.data_fixtures import DEMO_SP, synthetic_chats, write_jsonl

    src = write_jsonl(tmp_path / "train.jsonl", synthetic_chats(8, seed=3))
    over = [f"data.train={src}", f"data.tokenizer={DEMO_SP}", f"data.output_dir={tmp_path / 'out'}",
            "data.seq_length=256", "data.template=chatml", "model.vocab_size=4096", "data.valid=null",
            f"checkpoint.save={tmp_path / 'run'}"]  # not the demo's (runs/demo_cpu/ckpt, made by the README's set-up)
    open_datasets(load_config(None, over))
    (tmp_path / "out" / "train" / "tokens.npy").unlink()
    log = _Log()
    assert load_checked("configs/demo_cpu.yaml", over, log, check=True, dry_run=False) is None
    [(level, message)] = log.records
    assert level == "error" and "tokens.npy" in message


@pytest.mark.parametrize("value", ["abc", "", "8 gpus"])
def test_a_bad_world_size_is_a_config_error_naming_it(monkeypatch, value, log_records):
    """``WORLD_SIZE=abc ... --dry-run`` used to print Python's "invalid literal for int() with base 10: 'abc'",
    which names neither the variable nor what it should be."""
    from bft_megatron.train import main

    monkeypatch.setenv("WORLD_SIZE", value)
    assert main(["--config", "configs/demo_cpu.yaml", "--dry-run"]) == 2
    assert any(f"WORLD_SIZE={value!r} is not a whole number of processes" in r.getMessage() for r in log_records)


def test_train_help_says_what_check_and_dry_run_look_at(capsys):
    """--check is the SLURM pre-flight: its help used to say only "load and validate the config"."""
    from bft_megatron.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "check the inputs on disk (checkpoint.load, data sources, tokenizer, prepared data)" in text
    assert "validate for WORLD_SIZE processes (no paths checked)" in text


@pytest.mark.parametrize("rank, warned", [("0", True), ("1", False), ("x", False), (" 0\n", True), ("", True),
                                          (None, True)])
def test_config_warnings_come_from_rank_0_only_and_a_bad_rank_is_no_traceback(monkeypatch, rank, warned):
    """RANK unset or empty (outside torchrun) is rank 0; without WORLD_SIZE the layout is for one process."""
    from bft_megatron.training.preflight import load_checked

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    log = _Log()
    _, layout = load_checked("configs/demo_cpu.yaml", ["data.seq_length=512"], log, check=False, dry_run=True)
    assert layout.world_size == 1
    assert [level for level, _ in log.records] == (["warning"] if warned else [])


def test_a_real_run_of_several_processes_without_a_launcher_is_refused():
    """``WORLD_SIZE=2 bft-megatron train ...`` (WORLD_SIZE exported for --check, then a real start) waited silently
    for a second process until the collective timeout, and a SIGTERM did not end it; --check and --dry-run still
    take WORLD_SIZE by hand. (A subprocess: the broken behaviour hangs, and the timeout kills it.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env["WORLD_SIZE"] = "2"
    cmd = [sys.executable, "-m", "bft_megatron.train", "--config", "configs/demo_cpu.yaml", "train.global_batch_size=8"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert ("config error: WORLD_SIZE=2 but RANK is not set: no launcher started this process, and the other 1 "
            "would never join. Start a run of several processes with launch/torchrun.sh") in run.stderr
    planned = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr[-2000:]


def test_check_says_a_finished_run_has_nothing_to_train(tmp_path):
    """``--check`` of a run whose own checkpoint is at train.train_iters said only "config OK"; the real start then
    stopped at once (its first log lines said why)."""
    from bft_megatron.checkpoint import pointer
    from bft_megatron.training.preflight import load_checked
    from tests.data_fixtures import checkpoint_common, megatron_marker
    from tests.launch import TINY

    save = str(tmp_path / "run")
    over = TINY + [f"checkpoint.save={save}"]
    megatron_marker(os.path.join(save, pointer.iter_dirname(4)), checkpoint_common(load_config(None, over), 4))
    pointer.write_latest(save, 4)
    log = _Log()
    assert load_checked(None, over, log, check=True, dry_run=False) is not None
    [(level, message)] = [r for r in log.records if "nothing to train" in r[1]]
    assert level == "warning" and message.startswith(f"config: checkpoint.save={save}'s latest checkpoint is at "
                                                     "iteration 4, already train.train_iters=4: nothing to train")
    log.records.clear()
    assert load_checked(None, over + ["train.train_iters=6", "checkpoint.override_scheduler=true"], log, check=True,
                        dry_run=False) is not None
    assert not [r for r in log.records if "nothing to train" in r[1]]


def test_check_names_every_missing_input_at_once(tmp_path):
    """A recipe's placeholder paths all in one --check (it stopped at the first: one fix per run)."""
    from bft_megatron.config import check_paths

    cfg = load_config("configs/llama3.1_70b_tp8pp4.yaml", [f"checkpoint.save={tmp_path}/run"])
    with pytest.raises(ConfigError) as exc:
        check_paths(cfg)
    lines = str(exc.value).splitlines()
    assert lines[0] == "4 problems:"
    assert [line.split("=")[0].strip() for line in lines[1:]] == ["data.train[0].path", "data.valid[0].path",
                                                                  "data.tokenizer", "checkpoint.load"]
    assert "checkpoint.load=/path/to/ckpt/llama3.1-70b does not exist" in lines[4]
