"""``bft-megatron train --eval-only --eval-samples FILE``: BFT's statistics of every validation sample as JSONL, end
to end (real processes on CPU, TINY model after one training step, a prepared packed validation split whose row count
is no multiple of the global batch: the last batch has padding rows). The lines are the same at DP1, DP2 and PP2
(interleaved, and with loss.method=sft: the statistics are BFT's whatever the method), cover every sample of the
split once, name it by its index and sample_id, and average to the metrics of --eval-out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bft_megatron.data import prepare
from bft_megatron.data.storage import PackedDataset
from tests.data_fixtures import DEMO_SP, write_jsonl
from tests.test_train_eval_only import _train

pytestmark = pytest.mark.slow

GROUP, GAMMA = 16, 2.0
CONFIG = [f"data.tokenizer={DEMO_SP}", "data.template=chatml", "model.vocab_size=3000", "data.seq_length=64",
          "loss.variant=v3", f"loss.group_size={GROUP}", f"loss.gamma={GAMMA}"]
FLOATS = ("lm_loss", "p_conf", "sample_weight")


def _chats(n: int) -> list[dict]:
    """Short chats (a few per packed row of 64 tokens), answers of 1-12 words: some under GROUP tokens, some not;
    every third one two turns."""
    rng = np.random.default_rng(3)
    words = "the gene causes a phenotype with abnormal growth of the skull and ataxia".split()

    def text(k):
        return " ".join(rng.choice(words, size=k))
    out = []
    for i in range(n):
        turns = [{"role": "user", "content": text(2)}, {"role": "assistant", "content": text(rng.integers(1, 13))}]
        out.append({"messages": turns * (2 if i % 3 == 0 else 1)})
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_samples")
    held_out = write_jsonl(tmp / "held_out.jsonl", _chats(40))
    out = tmp / "prepared"
    assert prepare.main(["--valid", str(held_out), "--output", str(out), "--tokenizer", DEMO_SP, "--template",
                         "chatml", "--seq-length", "64", "--no-progress"]) == 0
    config = [*CONFIG, f"data.valid=[{held_out}]", f"data.output_dir={out}", f"checkpoint.save={tmp / 'run'}"]
    # one training step (on the held-out chats too): the checkpoint gives every layout the same weights (the initial
    # ones depend on the pipeline layout)
    proc = _train(*config, f"data.train=[{held_out}]", "train.train_iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, PackedDataset(out / "valid"), tmp


def _evaluate(config, tmp, name, *extra, nproc=1):
    """(metrics of --eval-out, the JSONL lines) of one --eval-only run; the JSONL's folder does not exist yet."""
    metrics, samples = tmp / name / "metrics.json", tmp / name / "new" / "samples.jsonl"
    proc = _train(*config, *extra, "--eval-only", "--eval-out", str(metrics), "--eval-samples", str(samples),
                  nproc=nproc)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(metrics.read_text())["metrics"], lines


def _assert_same_lines(got, want):
    assert [x["index"] for x in got] == [x["index"] for x in want]
    for a, b in zip(got, want):
        assert (a["sample_id"], a["tokens"], a["short"]) == (b["sample_id"], b["tokens"], b["short"]), a["index"]
        for k in FLOATS:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["index"], k)


def test_per_sample_statistics_cover_the_split_and_match_across_layouts(split):
    config, valid, tmp = split
    assert len(valid) % 8 and valid.packed and len(valid.sample_ids) > len(valid)  # padding rows; packed rows
    metrics, lines = _evaluate(config, tmp, "dp1")
    # every sample of the split once, in order, named by its index and its source conversation
    assert [x["index"] for x in lines] == list(range(len(valid.sample_ids)))
    assert [x["sample_id"] for x in lines] == valid.sample_ids.tolist()
    offsets, mask = valid.sample_offsets, np.asarray(valid.loss_mask)
    assert [x["tokens"] for x in lines] == [int(mask[offsets[i]:offsets[i + 1]].sum()) for i in range(len(lines))]
    assert all(x["tokens"] > 0 for x in lines)  # (samples without one get nulls: tests/test_loss_samples.py)
    assert [x["short"] for x in lines] == [x["tokens"] < GROUP for x in lines] and 0 < sum(x["short"] for x in lines)
    assert not all(x["short"] for x in lines)
    for x in lines:
        assert x["sample_weight"] == pytest.approx(1 - x["p_conf"] ** GAMMA, abs=1e-12)
    # exactly what the objective's metrics average: lm_loss over tokens, p_conf and sample_weight over samples
    tokens = np.array([x["tokens"] for x in lines])
    assert metrics["lm_loss"] == pytest.approx(float(np.dot(tokens, [x["lm_loss"] for x in lines]) / tokens.sum()),
                                               abs=1e-6)
    for k in ("p_conf", "sample_weight"):
        assert metrics[k] == pytest.approx(float(np.mean([x[k] for x in lines])), abs=1e-9), k
    assert metrics["p_conf_min"] == pytest.approx(min(x["p_conf"] for x in lines), abs=1e-12)
    # another data-parallel split of the same rows; pipeline stages (the last one is not global rank 0), interleaved,
    # under plain SFT: the same lines
    _assert_same_lines(_evaluate(config, tmp, "dp2", nproc=2)[1], lines)
    pp_metrics, pp_lines = _evaluate(config, tmp, "pp2", "parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1",
                                     "loss.method=sft", nproc=2)
    assert "p_conf" not in pp_metrics and pp_metrics["lm_loss"] == pytest.approx(metrics["lm_loss"], abs=1e-6)
    _assert_same_lines(pp_lines, lines)


def test_eval_samples_needs_eval_only(tmp_path):
    proc = _train("--eval-samples", str(tmp_path / "s.jsonl"))
    assert proc.returncode == 2 and "--eval-samples needs --eval-only" in proc.stderr
    assert not (tmp_path / "s.jsonl").exists()
