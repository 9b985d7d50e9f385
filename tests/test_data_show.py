"""``bft-megatron show-data``: prepared samples decoded with exactly their supervised targets marked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bft_megatron.data.errors import DataError
from bft_megatron.data.show import CLOSE, OPEN, main, marked_text, show, supervised_targets
from tests.data_fixtures import CHATS, DEMO_SP, hf_tokenizer, prepare_dir


def test_supervised_targets_undo_the_shift():
    # loss_mask[t] = 1 means token t+1 is predicted: the targets are one to the right, the first never
    assert supervised_targets(np.array([0, 1, 1, 0, 0, 1, 0])).tolist() == [False, False, True, True, False,
                                                                           False, True]


def test_marked_text_wraps_each_run():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731 - a stand-in tokenizer
    target = np.array([False, True, True, False, True])
    assert marked_text(np.arange(5), target, decode) == f"a{OPEN}bc{CLOSE}d{OPEN}e{CLOSE}"
    assert marked_text(np.arange(2), np.array([False, False]), decode) == "ab"


def test_show_marks_the_answers_and_nothing_else(tmp_path):
    split = prepare_dir(tmp_path / "o", CHATS, tokenizer=hf_tokenizer("qwen25"), template="tokenizer", packing=False)
    text = show(str(tmp_path / "o"), samples=10)  # the output directory; its train/ split is the default
    assert text.startswith(f"{split}: 4 samples in 4 rows of 256 tokens, template 'tokenizer'")
    body = text.split("\n", 1)[1]  # below the header line (which explains the markers)
    marked = [chunk.split(CLOSE)[0] for chunk in body.split(OPEN)[1:]]
    answers = ["A small head circumference.", "Many, for example ASPM.", "Poor coordination of movement.",
               "Fine, thank you.", "The quick brown fox."]
    assert sorted(marked) == sorted(a + "<|im_end|>" for a in answers)
    assert "What is microcephaly?" in body and body.count("--- sample ") == 4
    assert show(str(split), samples=1, start=3).count("--- sample 3 ") == 1  # a split directory works too


def test_show_errors_name_the_directory(tmp_path, capsys):
    with pytest.raises(DataError, match="not a prepared split"):
        show(str(tmp_path))
    prepare_dir(tmp_path / "o", CHATS[:1])
    with pytest.raises(DataError, match=r"--start 7 is outside its 1 samples \[0, 1\)"):
        show(str(tmp_path / "o"), start=7)
    index_path = tmp_path / "o" / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"]["path"] = "relative/tok.model"  # prepared from another working directory
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="relative to that run's working directory: run from there, or pass "
                                        "--tokenizer"):
        show(str(tmp_path / "o"))
    assert "A small head" in show(str(tmp_path / "o"), tokenizer=DEMO_SP)
    # another tokenizer with a smaller vocabulary: an error naming both (sentencepiece raised IndexError)
    with pytest.raises(DataError, match=r"token id \d+ is outside .*vocabulary of 400: the split was prepared with "
                                        r"relative/tok\.model"):
        show(str(tmp_path / "o"), tokenizer=hf_tokenizer("qwen25"))
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path / "o"), "--samples", "0"]) == 2
    assert main([str(tmp_path / "o"), "--tokenizer", DEMO_SP]) == 0
    assert f"{OPEN}A small head circumference.<|im_end|>{CLOSE}" in capsys.readouterr().out
