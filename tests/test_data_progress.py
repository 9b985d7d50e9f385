"""Long preparations: progress (a bar on a terminal, log lines with a total and an ETA elsewhere: a batch job's log,
the trainer's first use while the other ranks wait), workers (capped at the cores; outliving the launcher's exit
signals), Ctrl-C."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data import progress
from bft_megatron.data.prepare import run
from tests.data_fixtures import CHATS, DEMO_SP, logged, synthetic_chats, write_jsonl


def test_the_total_is_the_non_blank_lines_of_json_lines_sources_else_unknown(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", CHATS)
    lines = [json.dumps(c) for c in CHATS[:2]]
    (tmp_path / "blank.jsonl").write_text("\n".join(lines) + "\n\n  \n" + json.dumps(CHATS[0]))  # no final newline
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(c) for c in CHATS) + "\n")
    sources = [SourceConfig(str(a)), SourceConfig(str(tmp_path / "blank.jsonl"), weight=2.0),
               SourceConfig(str(tmp_path / "c.jsonl.gz"))]
    assert progress.count_records(sources) == 2 * len(CHATS) + 3  # records, whatever the weights
    (tmp_path / "d.json").write_text(json.dumps(CHATS))
    assert progress.count_records(sources + [SourceConfig(str(tmp_path / "d.json"))]) is None
    assert progress.count_records([SourceConfig("owner/hub-dataset")]) is None
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q"}\n' * 50)[:30])
    for missing in ("missing.jsonl", "cut.jsonl.gz"):  # left for the reader to report, with its file and line
        assert progress.count_records(sources + [SourceConfig(str(tmp_path / missing))]) is None


@pytest.mark.parametrize("given, tty, mode", [(True, True, "bar"), (True, False, "log"), ("log", True, "log"),
                                              (False, True, "off"), (False, False, "off")])
def test_a_bar_only_on_a_terminal(monkeypatch, given, tty, mode):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty, raising=False)
    assert progress.progress_mode(given) == mode


def test_log_lines_say_how_far_how_fast_and_how_long(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with logged(logging.INFO) as records, progress.RecordProgress("tokenize train", 1000, "log") as bar:
        clock[0] += 30
        bar.update(100)  # before the first minute: nothing logged
        clock[0] += 30
        bar.update(100)
        clock[0] += 20
        bar.update(400)
    assert [r.getMessage() for r in records] == [
        "tokenize train: 200 of ~1000 records (20%), 3 rec/s, about 4 min left"]
    assert bar.line() == "tokenize train: 600 of ~1000 records (60%), 8 rec/s, about 53 s left"
    assert progress.RecordProgress("tokenize valid", None, "off").line().startswith("tokenize valid: 0 records, ")


def test_the_trainers_first_use_logs_progress_lines(tmp_path, monkeypatch):
    """prepare.run(progress="log"), as the trainer calls it, logs the line with the split's record count."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    src = write_jsonl(tmp_path / "in.jsonl", synthetic_chats(20, seed=2))
    cfg = DataConfig(train=[SourceConfig(str(src))], tokenizer=DEMO_SP, seq_length=256, output_dir=str(tmp_path / "o"))
    with logged(logging.INFO) as records:
        run(cfg, progress="log")
    lines = [r.getMessage() for r in records if r.getMessage().startswith("tokenize train: ")]
    assert lines and lines[-1].startswith("tokenize train: 20 of ~20 records (100%), ")


def test_workers_are_at_most_the_available_cores(monkeypatch):
    """A recipe's data.num_workers=16 on a 4-core job step: 4 workers (16 spawned processes thrashed), said once."""
    from bft_megatron.data import pipeline

    monkeypatch.setattr(pipeline, "available_cores", lambda: 4)
    with logged(logging.INFO) as records:
        assert pipeline._workers(DataConfig(num_workers=16)) == 4
        assert pipeline._workers(DataConfig(num_workers=3)) == 3
    assert [r.getMessage() for r in records] == ["data.num_workers=16 but 4 core(s) are available: tokenizing with 4"]


def test_ctrl_c_in_prepare_is_one_line_and_exit_130(tmp_path, monkeypatch):
    """A KeyboardInterrupt traceback before; nothing is published or left behind."""
    from bft_megatron.data import pipeline, prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "pack_best_fit", interrupted)
    src = write_jsonl(tmp_path / "in.jsonl", CHATS)
    with logged(logging.ERROR) as records:
        code = prepare.main(["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o"),
                             "--no-progress"])
    assert code == 130 and [r.getMessage() for r in records] == [
        "prepare interrupted: no split was published (one prepared before is kept as it was)"]
    assert not (tmp_path / "o").exists()  # made by this run: removed with its staging and scratch
    monkeypatch.undo()
    calls, pack = [], pipeline.pack_best_fit
    monkeypatch.setattr(pipeline, "pack_best_fit", lambda *a: pack(*a) if not calls.append(1) and len(calls) == 1
                        else interrupted())
    with logged(logging.ERROR) as records:  # during valid/, train/ being done
        code = prepare.main(["--input", str(src), "--valid", str(src), "--tokenizer", DEMO_SP, "--output",
                             str(tmp_path / "o"), "--no-progress"])
    assert code == 130 and [r.getMessage() for r in records] == [
        "prepare interrupted: train was published before it; the rest was not"]


WORKERS_UNDER_SIGNAL = """
import os, signal, sys, time
from bft_megatron.config.data import DataConfig
from bft_megatron.data import pipeline
from bft_megatron.data.records import to_conversation

def signal_the_group():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        os.killpg(0, sig)                              # as torchrun's agent signals the rank's process group

def chunks(when):
    text = "Short stature with microcephaly and seizures. " * 60
    conv = to_conversation({"prompt": text, "response": text}, "auto", "x:line 1")
    for i in range(120):
        if i == 0 and when == "starting":              # the pool's task thread asks at once: workers still start
            signal_the_group()
        yield [conv] * pipeline.CHUNK

if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGUSR1):       # the trainer's ExitRequest handles both
        signal.signal(sig, lambda *_: None)
    pipeline.available_cores = lambda: 2               # a pool of two whatever this machine has
    with pipeline._encoder(DataConfig(tokenizer=%(sp)r, num_workers=2)) as encode:
        results = encode(chunks(sys.argv[1]))
        done = [next(results)]
        if sys.argv[1] == "running":                   # a worker has run: every later chunk is queued for them
            signal_the_group()
        done += list(results)
    print("chunks:", len(done))
"""


@pytest.mark.parametrize("when", ["running", "starting"])
def test_pool_workers_outlive_the_exit_signals_sent_to_the_process_group(tmp_path, when):
    """torchrun ``killpg``s a rank's process group with SIGUSR1/SIGTERM; a ``data.num_workers`` pool worker killed
    mid-chunk lost that chunk and ``Pool.imap`` waited forever (first-use preparation hung the job until SIGKILL).
    Workers now sit in their own session with SIGUSR1 ignored. ``starting``: the signal kills workers that have not
    detached yet and the pool replaces them from its worker-handler thread; with PR_SET_PDEATHSIG their death at
    that thread's end in ``Pool.terminate()`` (one holding the task queue's lock) hung the pool's exit. In a
    subprocess with a timeout: a regression fails."""
    (tmp_path / "job.py").write_text(WORKERS_UNDER_SIGNAL % {"sp": DEMO_SP}, encoding="utf-8")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(tmp_path / "job.py"), when], capture_output=True, text=True,
                          timeout=180, cwd=repo, env=env, start_new_session=True)
    assert proc.returncode == 0 and "chunks: 120" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_one_worker_pool_serves_every_source_of_a_split(tmp_path, monkeypatch):
    """Each pool worker imports the data layer and loads the tokenizer (seconds at 16 workers): a pool per source
    repeated that for every source of a mix. The output is the one-process output."""
    from bft_megatron.data import pipeline

    pools = []
    spawn = pipeline.mp.get_context("spawn")

    class Counting:
        def Pool(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
            pools.append(args[0])
            return spawn.Pool(*args, **kwargs)

    monkeypatch.setattr(pipeline.mp, "get_context", lambda method: Counting())
    monkeypatch.setattr(pipeline, "available_cores", lambda: 2)
    sources = [SourceConfig(str(write_jsonl(tmp_path / f"{i}.jsonl", synthetic_chats(30, seed=i)))) for i in range(3)]
    outputs = {}
    for workers in (2, 1):
        cfg = DataConfig(train=sources, valid=sources[:1], tokenizer=DEMO_SP, seq_length=256,
                         output_dir=str(tmp_path / f"w{workers}"), num_workers=workers)
        run(cfg)
        outputs[workers] = [(tmp_path / f"w{workers}" / s / "tokens.npy").read_bytes() for s in ("train", "valid")]
    assert pools == [2, 2]  # one per split (train: 3 sources, valid: 1), none without workers
    assert outputs[2] == outputs[1]
