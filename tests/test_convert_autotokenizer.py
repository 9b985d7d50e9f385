"""The export's AutoTokenizer check: an exported folder loaded by ``AutoTokenizer`` must encode as training did, or the
export says so and names the class that does (transformers picks the class from config.json's model_type)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from bft_megatron.convert.chat_templates import BUILTIN_JINJA
from bft_megatron.convert.hf_config import write_hf_metadata
from bft_megatron.convert.sources import find_sources
from bft_megatron.data.tokenize import encode
from bft_megatron.data.tokenizer import load_tokenizer
from tests.test_convert_tokenizer import DEMO_TOKENIZER, ROOT, TINY_MODEL, _chats, _conv, _ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_warns_when_autotokenizer_would_encode_otherwise(tmp_path, family, log_records):
    """transformers 5 loads any model_type qwen2 folder with Qwen2Tokenizer (byte-level BPE rebuilt from
    tokenizer.json), which garbles the converted sentencepiece tokenizer: the export must say so and name the
    class that loads it right, and stay quiet where AutoTokenizer encodes as training did (llama)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_tokenizer(os.path.join(ROOT, DEMO_TOKENIZER))
    model = dataclasses.replace(TINY_MODEL, family=family, qkv_bias=family == "qwen2")
    write_hf_metadata(str(tmp_path), model, torch.float32,
                      find_sources({"data": {"tokenizer": DEMO_TOKENIZER, "template": "chatml"}, "model": {}}))
    chat = _chats(1)[0]
    training = encode(_conv(chat), "chatml", ours).tokens.tolist()
    auto_ok = _ids(AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(chat, tokenize=True)) == training
    warned = [r.getMessage() for r in log_records if "AutoTokenizer loads the exported tokenizer" in r.getMessage()]
    assert bool(warned) == (not auto_ok), warned
    if family == "llama":
        assert auto_ok
    else:
        assert warned == [] or ("Qwen2Tokenizer" in warned[0] and "PreTrainedTokenizerFast" in warned[0])
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))  # the way the warning names
    assert _ids(fast.apply_chat_template(chat, tokenize=True)) == training



def _qwen2_tokenizer_dir(tmp_path):
    """A byte-level BPE tokenizer directory with a qwen2 config.json: AutoTokenizer picks Qwen2Tokenizer there, which
    splits digits otherwise than the class its tokenizer_config.json names."""
    import shutil

    from tests.data_fixtures import hf_tokenizer

    trained = tmp_path / "hf_qwen"
    shutil.copytree(hf_tokenizer("qwen_plain"), trained)
    (trained / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return trained


def test_the_advice_names_the_class_that_encodes_as_training(tmp_path, log_records):
    """A Llama export given the qwen2 directory's tokenizer (--tokenizer): AutoTokenizer loads the export by
    tokenizer_config.json (TokenizersBackend, transformers 5's PreTrainedTokenizerFast), training's class was
    Qwen2Tokenizer. The warning advised PreTrainedTokenizerFast, the very class it had just said encodes otherwise."""
    import transformers

    trained = _qwen2_tokenizer_dir(tmp_path)
    out = tmp_path / "export"
    write_hf_metadata(str(out), TINY_MODEL, torch.float32, find_sources({}, tokenizer=str(trained)))
    [warned] = [r.getMessage() for r in log_records if "AutoTokenizer loads the exported tokenizer" in r.getMessage()]
    assert warned.endswith("load it with Qwen2Tokenizer.from_pretrained(EXPORT_DIR)"), warned
    probe = "The Human Phenotype Ontology (HPO), release 2024: abnormal gait."
    advised = transformers.Qwen2Tokenizer.from_pretrained(str(out))
    assert advised(probe)["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(trained))(probe)["input_ids"]


def test_a_stored_copy_is_checked_against_the_tokenizer_class_training_used(tmp_path, log_records):
    """A qwen2 model trained on an HF tokenizer directory whose config.json makes AutoTokenizer pick Qwen2Tokenizer
    (the trainer's class): exporting from the checkpoint's hf/ copy loaded the copied files by tokenizer_config.json
    alone (no config.json there yet), another class that splits digits otherwise, and warned that the export's
    AutoTokenizer "encodes otherwise than the training tokenizer", advising a class that does. It encodes as
    training did: no warning."""
    from transformers import AutoTokenizer

    from tests.data_fixtures import hf_tokenizer

    trained = _qwen2_tokenizer_dir(tmp_path)
    probe = "The Human Phenotype Ontology (HPO), release 2024: abnormal gait."
    trainer_tok = AutoTokenizer.from_pretrained(str(trained))
    by_files = AutoTokenizer.from_pretrained(hf_tokenizer("qwen_plain"))  # the class tokenizer_config.json names
    assert type(trainer_tok).__name__ == "Qwen2Tokenizer"
    assert trainer_tok(probe)["input_ids"] != by_files(probe)["input_ids"]  # the case: the classes encode otherwise
    model = dataclasses.replace(TINY_MODEL, family="qwen2", qkv_bias=True)
    config = {"data": {"tokenizer": str(trained), "template": "chatml"}, "model": {}}
    stored = tmp_path / "iter_0000002" / "hf"             # what the trainer's save writes beside the weights
    write_hf_metadata(str(stored), model, torch.float32, find_sources(config))
    out = tmp_path / "export"
    sources = find_sources(config, stored=str(stored))
    assert sources.tokenizer.stored and sources.tokenizer.training == str(trained)
    log_records.clear()
    write_hf_metadata(str(out), model, torch.float32, sources)
    warned = [r.getMessage() for r in log_records if "AutoTokenizer loads the exported tokenizer" in r.getMessage()]
    assert warned == []
    exported, chat = AutoTokenizer.from_pretrained(str(out)), _chats(1)[0]
    want = trainer_tok.apply_chat_template(chat, tokenize=True, chat_template=BUILTIN_JINJA["chatml"])
    assert _ids(exported.apply_chat_template(chat, tokenize=True)) == _ids(want)
