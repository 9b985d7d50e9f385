"""The tokenizer an HF export ships: sentencepiece -> HF conversion, chat templates, special ids, sources (fast)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from bft_megatron.config.schema import ModelConfig, RopeScaling
from bft_megatron.convert.chat_templates import BUILTIN_JINJA
from bft_megatron.convert.hf_config import write_hf_metadata
from bft_megatron.convert.importer import model_config_from_hf_dir
from bft_megatron.convert.sources import CLI_HINT, ExportSources, find_sources
from bft_megatron.convert.sp_tokenizer import sentencepiece_to_fast
from bft_megatron.data.records import Conversation, Message
from bft_megatron.data.templates import render
from bft_megatron.data.tokenizer import load_tokenizer
from bft_megatron.data.tokenize import encode
from tests.convert_models import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = "bft_megatron/data/assets/hpo_sp.model"  # as the demo config writes it: relative to the repo
DEMO_DATA = os.path.join(ROOT, "bft_megatron/data/assets/hpo_valid.jsonl")
TRICKY = ["  two  spaces\tand a tab\n\nnew lines ", "é ü 漢字 🙂 (HP:0001250)", "</s>a<s> b<pad>", " lead",
          "trail  "]
TINY_MODEL = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                         vocab_size=3000, max_position_embeddings=64)


def _chats(n: int = 20) -> list[list[dict]]:
    with open(DEMO_DATA, encoding="utf-8") as fh:
        chats = [json.loads(line)["messages"] for _, line in zip(range(n), fh)]
    chats.append([{"role": "system", "content": " sys "}, {"role": "user", "content": "q1 "},
                  {"role": "assistant", "content": " a1\n"}, {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "a2"}])
    chats.append([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."},  # plain's labels
                  {"role": "user", "content": "Ataxia?"}, {"role": "assistant", "content": "Poor coordination."}])
    return chats


def _conv(messages: list[dict]) -> Conversation:
    return Conversation(tuple(Message(m["role"], m["content"]) for m in messages), "test")


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_converted_demo_tokenizer_renders_and_encodes_as_training(template):
    """apply_chat_template of the export = the trainer's built-in template text and token ids, chat by chat."""
    ours = load_tokenizer(os.path.join(ROOT, DEMO_TOKENIZER))
    hf = sentencepiece_to_fast(os.path.join(ROOT, DEMO_TOKENIZER), chat_template=BUILTIN_JINJA[template])
    for chat in _chats():
        assert hf.apply_chat_template(chat, tokenize=False) == render(_conv(chat), template, ours).text
        assert _ids(hf.apply_chat_template(chat, tokenize=True)) == encode(_conv(chat), template, ours).tokens.tolist()
    for text in TRICKY:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode_offsets(text)[0], text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_generation_prompt_is_the_training_text_up_to_the_answer(template):
    """At inference the model sees apply_chat_template(history, add_generation_prompt=True): exactly the text it
    was trained on before the assistant's answer, the answer's first character following it directly."""
    ours = load_tokenizer(os.path.join(ROOT, DEMO_TOKENIZER))
    hf = sentencepiece_to_fast(os.path.join(ROOT, DEMO_TOKENIZER), chat_template=BUILTIN_JINJA[template])
    for chat in _chats():
        prompt = hf.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        trained = render(_conv(chat), template, ours).text
        answer = chat[-1]["content"]
        assert trained.startswith(prompt), (prompt, trained)
        assert trained[len(prompt):].startswith(answer.strip() if template == "llama3" else answer), template


def test_converted_bpe_tokenizer_with_dummy_prefix_encodes_as_sentencepiece(tmp_path):
    """The other sentencepiece settings: BPE, nmt_nfkc normalisation, dummy prefix, extra-whitespace removal."""
    import sentencepiece as spm

    lines = [m["content"] for chat in _chats(60) for m in chat]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
                                   byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2, num_threads=1)
    path = str(tmp_path / "bpe.model")
    with open(path, "wb") as fh:
        fh.write(model.getvalue())
    ours, hf = load_tokenizer(path), sentencepiece_to_fast(path)
    for text in TRICKY + [render(_conv(c), "chatml", ours).text for c in _chats(10)]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode_offsets(text)[0], text
    for text in [t for t in TRICKY if "<" not in t] + lines[:20]:  # generated answers: no control tokens
        ids = ours.encode_offsets(text)[0]
        assert hf.decode(ids) == ours.decode(ids), text  # the dummy prefix's space is stripped as in training


def test_export_metadata_from_the_training_sentencepiece_tokenizer(tmp_path):
    """No HF template anywhere: config.json / generation_config.json ids are the tokenizer's, not Llama's 1/2."""
    ours = load_tokenizer(os.path.join(ROOT, DEMO_TOKENIZER))
    config = {"data": {"tokenizer": DEMO_TOKENIZER, "template": "chatml"}, "model": {}}
    sources = find_sources(config)
    assert sources.template_dir is None and sources.tokenizer.template == "chatml"
    write_hf_metadata(str(tmp_path), TINY_MODEL, torch.float32, sources)
    with open(tmp_path / "config.json") as fh:
        cfg = json.load(fh)
    with open(tmp_path / "generation_config.json") as fh:
        gen = json.load(fh)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 3, 0) == \
        (ours.bos_id, ours.eos_id, ours.pad_id)
    assert gen["eos_token_id"] == [ours.eos_id, ours.token_to_id("<|im_end|>")] and gen["bos_token_id"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    chat = _chats(1)[0]
    assert _ids(tok.apply_chat_template(chat, tokenize=True)) == encode(_conv(chat), "chatml", ours).tokens.tolist()
    # transformers 5 saves the generic class as TokenizersBackend, which transformers 4.x (vLLM) cannot load
    with open(tmp_path / "tokenizer_config.json") as fh:
        assert json.load(fh)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_hf_tokenizer_without_template_gets_the_training_one_and_explicit_wins(tmp_path, log_records):
    hf_tok = str(tmp_path / "tok")
    make_tokenizer(hf_tok, 100)
    config = {"data": {"tokenizer": str(tmp_path / "moved_away"), "template": "llama3"}, "model": {"from_hf": hf_tok}}
    sources = find_sources(config)  # the recorded tokenizer is gone: model.from_hf's, with a warning
    assert sources.tokenizer.path == hf_tok and sources.tokenizer.template == "llama3"
    assert any("moved_away" in r.getMessage() and "--tokenizer" in r.getMessage() for r in log_records)
    out = str(tmp_path / "out")
    write_hf_metadata(out, ModelConfig(**{**TINY_MODEL.__dict__, "vocab_size": 100}), torch.float32, sources)
    with open(os.path.join(out, "tokenizer_config.json")) as fh:
        assert json.load(fh)["chat_template"] == BUILTIN_JINJA["llama3"]
    # A tokenizer without a pad token: training padded with eos, and the export says so too.
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["pad_token_id"] == load_tokenizer(hf_tok).pad_id == 2
    with open(os.path.join(out, "tokenizer.json"), "rb") as a, open(os.path.join(hf_tok, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()  # copied, not re-serialised
    explicit = find_sources(config, tokenizer=DEMO_TOKENIZER)
    assert explicit.tokenizer.path.endswith("hpo_sp.model") and explicit.tokenizer.origin == "--tokenizer"
    with pytest.raises(FileNotFoundError, match=r"--tokenizer .*nope.model: no such file or directory"):
        find_sources(config, tokenizer=str(tmp_path / "nope.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: neither an HF tokenizer directory nor a sentencepiece"):
        find_sources(config, tokenizer=str(tmp_path / "empty"))


def test_no_tokenizer_anywhere_warns_with_the_option_and_writes_no_default_ids(tmp_path, log_records):
    sources = find_sources({"model": {}, "data": {}})
    assert sources.tokenizer is None and sources.hint == CLI_HINT
    write_hf_metadata(str(tmp_path), TINY_MODEL, torch.float32, sources)
    with open(tmp_path / "config.json") as fh:
        cfg = json.load(fh)
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None
    warning = next(r.getMessage() for r in log_records if "NO TOKENIZER" in r.getMessage())
    assert "--tokenizer PATH" in warning and "--hf DIR" in warning
    hint = "set data.tokenizer"
    write_hf_metadata(str(tmp_path / "job"), TINY_MODEL, torch.float32, ExportSources(None, None, [], hint))
    assert hint in [r.getMessage() for r in log_records if "NO TOKENIZER" in r.getMessage()][-1]


def test_prepared_data_records_the_tokenizer_when_data_tokenizer_is_unset(tmp_path):
    """A run that read an already prepared data.output_dir: its index names the tokenizer and template."""
    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import run

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _chats(4)))
    data = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=os.path.join(ROOT, DEMO_TOKENIZER),
                      template="plain", seq_length=64, output_dir=str(tmp_path / "prepared"))
    run(data)
    found = find_sources({"data": {"tokenizer": "", "output_dir": data.output_dir}}).tokenizer
    assert found.path.endswith("hpo_sp.model") and found.template == "plain" and found.record["eos_id"] == 3
    # data.tokenizer set but data.template left at its default: the rows were still rendered with "plain"
    named = find_sources({"data": {"tokenizer": data.tokenizer, "template": "chatml", "output_dir": data.output_dir}})
    assert named.tokenizer.template == "plain"


def test_mismatched_template_is_an_error_with_hf_and_skipped_otherwise(tmp_path, log_records):
    """--hf names the config.json to use: a mismatch fails (before any shard); model.from_hf's (e.g. a run that
    changed an architecture field) only warns, and config.json is synthesised."""
    hf = str(tmp_path / "hf")
    make_tokenizer(hf, 100)
    with open(os.path.join(hf, "config.json"), "w") as fh:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 96, "vocab_size": 3000}, fh)
    with pytest.raises(ValueError, match="hidden_size: template 32 vs weights 64"):
        write_hf_metadata(str(tmp_path / "a"), TINY_MODEL, torch.float32, find_sources({}, hf_dir=hf))
    assert not os.path.exists(tmp_path / "a" / "config.json")
    write_hf_metadata(str(tmp_path / "b"), TINY_MODEL, torch.float32, find_sources({"model": {"from_hf": hf}}))
    with open(tmp_path / "b" / "config.json") as fh:
        assert json.load(fh)["hidden_size"] == 64
    assert any("does not describe the exported model" in r.getMessage() for r in log_records)


ROUND_TRIP = {
    "llama31": dict(rope_theta=500000.0, norm_epsilon=1e-5, max_position_embeddings=256,
                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=128)),
    "llama32_tied": dict(tie_embeddings=True, norm_epsilon=2e-6, rope_theta=5e5,
                         rope_scaling=RopeScaling(32.0, 2.0, 8.0, 64)),
    "qwen2": dict(family="qwen2", qkv_bias=True, tie_embeddings=True, norm_epsilon=1e-6, rope_theta=1e6),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
@pytest.mark.parametrize("dtype,label", [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")])
def test_synthesised_config_reads_back_as_the_exported_model(tmp_path, name, dtype, label):
    """Without a template, config.json is built from the model section: read back (ours and transformers'),
    every field that shapes the outputs is the model's, and the dtype label is the weights' dtype."""
    from transformers import AutoConfig

    model = ModelConfig(**{**TINY_MODEL.__dict__, **ROUND_TRIP[name]})
    write_hf_metadata(str(tmp_path), model, dtype, ExportSources(None, None, [], CLI_HINT))
    back = model_config_from_hf_dir(str(tmp_path))
    for field in ("family", "hidden_size", "num_layers", "num_attention_heads", "kv_groups", "ffn_hidden_size",
                  "vocab_size", "tie_embeddings", "qkv_bias", "rope_theta", "rope_scaling", "norm_epsilon",
                  "max_position_embeddings"):
        assert getattr(back, field) == getattr(model, field), field
    with open(tmp_path / "config.json") as fh:
        raw = json.load(fh)
    assert raw["dtype"] == raw["torch_dtype"] == label
    # what a transformers 4.x reader (most serving stacks) looks at: top-level RoPE keys, not rope_parameters
    assert raw["rope_theta"] == model.rope_theta
    if model.rope_scaling is not None:
        rs = model.rope_scaling
        assert raw["rope_scaling"] == {"rope_type": "llama3", "factor": rs.factor,
                                       "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                                       "original_max_position_embeddings": rs.original_max_position_embeddings}
    else:
        assert raw.get("rope_scaling") is None
    assert not {"id2label", "label2id", "return_dict"} & set(raw)  # transformers' generic defaults left out
    hf = AutoConfig.from_pretrained(str(tmp_path))
    assert hf.rms_norm_eps == model.norm_epsilon and hf.tie_word_embeddings == model.tie_embeddings
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling or {}
    if model.rope_scaling is not None:
        assert rope.get("rope_type") == "llama3" and rope["factor"] == model.rope_scaling.factor
        assert rope["original_max_position_embeddings"] == model.rope_scaling.original_max_position_embeddings


@pytest.mark.parametrize("field,value", [("rope_theta", 1e6), ("norm_epsilon", 1e-6),
                                         ("rope_scaling", RopeScaling(16.0, 1.0, 4.0, 8192))])
def test_template_config_with_other_rope_or_norm_is_rejected(tmp_path, field, value):
    """--hf's config.json is kept only if it describes the weights, RoPE and the norm's epsilon included."""
    model = ModelConfig(**{**TINY_MODEL.__dict__, "rope_scaling": RopeScaling()})
    write_hf_metadata(str(tmp_path / "hf"), model, torch.float32, ExportSources(None, None, [], CLI_HINT))
    other = ModelConfig(**{**model.__dict__, field: value})
    with pytest.raises(ValueError, match=f"{field}: template"):
        write_hf_metadata(str(tmp_path / "out"), other, torch.float32, find_sources({}, hf_dir=str(tmp_path / "hf")))


@pytest.mark.parametrize("template,expect_builtin", [("llama3", True), ("tokenizer", False)])
def test_tokenizer_with_its_own_template_exports_the_one_training_used(tmp_path, template, expect_builtin):
    """A built-in training template replaces the tokenizer's own (evaluation prompts = training prompts);
    ``data.template: tokenizer`` keeps it. A separate chat_template.jinja would take precedence: not copied."""
    hf_tok = str(tmp_path / "tok")
    make_tokenizer(hf_tok, 100)
    own = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    with open(os.path.join(hf_tok, "tokenizer_config.json")) as fh:
        config = json.load(fh)
    config["chat_template"] = own
    with open(os.path.join(hf_tok, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    with open(os.path.join(hf_tok, "chat_template.jinja"), "w") as fh:
        fh.write(own)
    sources = find_sources({"data": {"tokenizer": hf_tok, "template": template}, "model": {}})
    out = str(tmp_path / "out")
    write_hf_metadata(out, ModelConfig(**{**TINY_MODEL.__dict__, "vocab_size": 100}), torch.float32, sources)
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(out).chat_template
    assert exported == (BUILTIN_JINJA["llama3"] if expect_builtin else own)
    assert os.path.isfile(os.path.join(out, "chat_template.jinja")) != expect_builtin


def test_publishing_into_a_folder_removes_an_older_exports_template_file(tmp_path):
    from bft_megatron.convert.hf_io import publish_staging

    stage, out = tmp_path / ".out.partial", tmp_path / "out"
    stage.mkdir()
    out.mkdir()
    (stage / "tokenizer_config.json").write_text("{}")
    (out / "chat_template.jinja").write_text("old")  # would take precedence over tokenizer_config.json's
    (out / "README.md").write_text("kept")
    publish_staging(str(stage), str(out))
    assert sorted(os.listdir(out)) == ["README.md", "tokenizer_config.json"] and not stage.exists()


def test_publishing_into_a_folder_says_which_of_its_files_are_replaced_or_removed(tmp_path, log_records):
    """An export into an existing folder replaces its config.json and removes tokenizer files the export does not
    write (a user's special_tokens_map.json, tokenizer.model): never silently."""
    from bft_megatron.convert.hf_io import publish_staging

    stage, out = tmp_path / ".out.partial", tmp_path / "out"
    stage.mkdir()
    out.mkdir()
    for name in ("tokenizer_config.json", "config.json"):
        (stage / name).write_text("{}")
    (out / "config.json").write_text('{"mine": 1}')
    (out / "special_tokens_map.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    publish_staging(str(stage), str(out))
    warning = next(r.getMessage() for r in log_records if "already held files" in r.getMessage())
    assert "replaced ['config.json']" in warning and "removed ['special_tokens_map.json']" in warning
    assert "notes.txt" not in warning and (out / "notes.txt").read_text() == "kept"


def test_an_export_into_a_checkpoint_directory_is_refused(tmp_path):
    """`--out` given the `--ckpt` path (a run's or an import's directory, or one iter_ directory) would mix the HF
    files into the checkpoint; refused before anything is written, as `convert import` refuses the reverse."""
    from bft_megatron.convert.hf_io import stale_weights_error

    run = tmp_path / "run"
    (run / "iter_0000006").mkdir(parents=True)
    (run / "iter_0000006" / ".metadata").write_bytes(b"")
    assert "holds a bft-megatron checkpoint" in stale_weights_error(str(run))  # an iter_ directory, no latest yet
    (run / "latest").write_text("iter_0000006")
    assert "'latest' pointer to iter_0000006" in stale_weights_error(str(run))
    assert "holds a bft-megatron checkpoint" in stale_weights_error(str(run / "iter_0000006"))
    assert stale_weights_error(str(tmp_path / "new")) is None


def test_reexport_from_an_export_updates_both_dtype_spellings(tmp_path):
    """An export's config.json carries `dtype` (transformers 5) and `torch_dtype` (4.x, what serving stacks
    pinned to it read). Used again as the template (`--hf` an export, or the hf/ of an import of one), the new
    weights' dtype must reach both keys: a stale one makes such a reader load, say, fp32 weights as bf16."""
    first = str(tmp_path / "bf16")
    write_hf_metadata(first, TINY_MODEL, torch.bfloat16, ExportSources(None, None, [], CLI_HINT))
    again = str(tmp_path / "fp32")
    write_hf_metadata(again, TINY_MODEL, torch.float32, find_sources({}, hf_dir=first))
    with open(os.path.join(again, "config.json")) as fh:
        raw = json.load(fh)
    assert (raw["dtype"], raw["torch_dtype"]) == ("float32", "float32")


@pytest.mark.parametrize("kept", ["dtype", "torch_dtype"])
def test_a_template_with_one_dtype_spelling_gets_both(tmp_path, kept):
    """transformers 5 saves only `dtype` (4.x only `torch_dtype`); docs/convert.md promises both in every config.json
    written, as for the rope keys: a 4.x reader of an export from a transformers-5 template found no torch_dtype."""
    template = tmp_path / "hf"
    write_hf_metadata(str(template), TINY_MODEL, torch.bfloat16, ExportSources(None, None, [], CLI_HINT))
    raw = json.loads((template / "config.json").read_text())
    raw.pop("torch_dtype" if kept == "dtype" else "dtype")
    (template / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    write_hf_metadata(str(out), TINY_MODEL, torch.float32, find_sources({}, hf_dir=str(template)))
    got = json.loads((out / "config.json").read_text())
    assert (got.get("dtype"), got.get("torch_dtype")) == ("float32", "float32")


def test_a_transformers5_template_gets_the_4x_rope_keys(tmp_path):
    """A template config.json saved by transformers 5 has only `rope_parameters`; the export adds top-level
    `rope_theta` / `rope_scaling`, or a 4.x reader (vLLM pinned to it) would run theta 10000 without llama3 scaling."""
    model = ModelConfig(**{**TINY_MODEL.__dict__, "rope_theta": 500000.0, "rope_scaling": RopeScaling()})
    template = tmp_path / "hf"
    write_hf_metadata(str(template), model, torch.bfloat16, ExportSources(None, None, [], CLI_HINT))
    raw = json.loads((template / "config.json").read_text())
    raw.pop("rope_theta"), raw.pop("rope_scaling")  # as transformers 5 writes it
    (template / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    write_hf_metadata(str(out), model, torch.bfloat16, find_sources({}, hf_dir=str(template)))
    got = json.loads((out / "config.json").read_text())
    assert got["rope_theta"] == 500000.0 and got["rope_parameters"]["rope_theta"] == 500000.0
    assert got["rope_scaling"]["rope_type"] == "llama3" and got["rope_scaling"]["factor"] == RopeScaling().factor


@pytest.mark.parametrize("files, is_one", [(["tokenizer.json"], True), (["spiece.model"], True), (["vocab.txt"], True),
                                           (["tok.tiktoken"], True), (["chat_template.jinja"], False),
                                           (["tokenizer_config.json"], True), (["sentencepiece.bpe.model"], True),
                                           (["tokenizer/x"], False),  # a folder named like a tokenizer file
                                           (["special_tokens_map.json", "config.json"], False), ([], False)])
def test_the_trainer_and_the_export_agree_on_what_a_tokenizer_directory_is(tmp_path, files, is_one):
    """One rule (data/tokenizer.py has_tokenizer_files): a directory the data layer tokenizes with is one the
    export finds, and one it refuses (a chat template alone) the export skips."""
    from bft_megatron.convert.sources import is_tokenizer
    from bft_megatron.data.errors import DataError
    from bft_megatron.data.tokenizer import check_tokenizer_path, has_tokenizer_files

    (tmp_path / "config.json").write_text("{}")
    for name in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert is_tokenizer(str(tmp_path)) == is_one
    # neither a path that is not there nor a file other than a sentencepiece .model (no iterdir on either)
    assert not is_tokenizer(str(tmp_path / "missing")) and not is_tokenizer(str(tmp_path / "config.json"))
    assert not has_tokenizer_files(tmp_path / "missing") and not has_tokenizer_files(tmp_path / "config.json")
    if is_one:
        check_tokenizer_path(str(tmp_path))
    else:
        with pytest.raises(DataError, match="a directory without tokenizer files"):
            check_tokenizer_path(str(tmp_path))
