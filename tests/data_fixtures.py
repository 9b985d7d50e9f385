"""Shared builders for the data-layer tests: tiny HF tokenizers with Llama-3.1- and Qwen2.5-like chat
templates (written for these tests), the bundled demo sentencepiece model, and small chat files."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "bft_megatron" / "data" / "assets"
DEMO_SP = str(ASSETS / "hpo_sp.model")

# Llama-3.1-like: bos, a system header that injects knowledge/today dates, trimmed contents,
# no generation markers around assistant content.
LLAMA31_LIKE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen2.5-like: a default system prompt is injected when the chat has none.
QWEN25_LIKE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Rewrites earlier turns (like templates that drop past reasoning): earlier answers get a "(earlier) "
# prefix only once a later turn exists, so prefix differences fail and the search fallback is used.
REWRITING = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and not loop.last %}"
    "{{- '<|im_start|>assistant\\n(earlier) ' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# QwQ-32B / DeepSeek-R1-Distill-Qwen-like: the generation prompt opens a '<think>\n' the full chat does not hold, so
# no turn's prompt is a prefix of the full chat and the search fallback is used even for one turn.
THINKING = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# Qwen3 / Qwen3-Thinking-like: every assistant turn opens a think block, empty when the answer carries no
# '<think>...</think>' (text written between the turn's header and the answer), and the generation prompt ends
# inside it ('<think>\n': the prompt's end lies inside an answer that starts with its reasoning).
QWEN3_LIKE = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{%- if '</think>' in message['content'] %}"
    "{%- set reasoning = message['content'].split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}{%- set reasoning = '' %}{%- set content = message['content'] %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# Qwen3-like as to history: reasoning is kept in the chat's last answer only (Qwen3 keeps it after the last user
# message), earlier answers lose it.
QWEN3_STRIP = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- if loop.last and '</think>' in message['content'] %}"
    "{%- set reasoning = message['content'].split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen1.5-Chat-like: '<|im_end|>' only between turns, none after the chat's last message.
QWEN15_LIKE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- if (loop.last and add_generation_prompt) or not loop.last %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# GLM-4.5-like: no end-of-turn token; a turn ends where the next role tag begins.
ROLE_TAGS = ("{%- for message in messages %}{{- '<' + message['role'] + '>\\n' + message['content'] }}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<assistant>\\n' }}{%- endif %}")

# DeepSeek-R1-Distill-like: every assistant turn is rendered without its reasoning (what precedes '</think>'), and
# the generation prompt opens '<think>\n': the full chat holds no reasoning at all.
R1_LIKE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- else %}{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

# Mistral-v0.3-like: no assistant header and no generation prompt ('[/INST]' ends the question); an answer is
# closed by a space and '</s>'.
MISTRAL_LIKE = ("{%- for message in messages %}{%- if message['role'] == 'user' %}"
                "{{- ' [INST] ' + message['content'] + ' [/INST]' }}"
                "{%- else %}{{- ' ' + message['content'] + ' </s>' }}{%- endif %}{%- endfor %}")

# Refuses chats whose roles do not alternate (as Mistral's, Llama-2's and Gemma's templates do), via raise_exception.
ALTERNATING = (
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# microsoft/phi-4's template: '<|im_sep|>' between role and content, no newlines, '<|im_end|>' closes each turn.
PHI4_LIKE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}")

# google/gemma-3-*-it's template (string contents): bos_token written by the template, the system prompt merged
# into the first user turn, 'assistant' written as 'model', contents trimmed, '<end_of_turn>\n' closes every turn.
GEMMA3_LIKE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
    "Microcephaly is a head circumference below the normal range.", "Which genes are linked to ataxia?",
    "You are a helpful assistant.", "system user assistant", "Cutting Knowledge Date: December 2023",
] * 20

SPECIALS = {
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "phi": ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
    "r1": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
}


# Qwen2's pre-tokenizer split: punctuation takes the newlines after it ('>\n\n' is one piece), so a prompt ending
# '<think>\n' and an answer starting '\n' merge into a token the prompt alone does not have.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")


def _build_hf(kind: str, template: str | None, corpus: tuple[str, ...] = ()) -> str:
    """A BPE tokenizer trained on CORPUS (+ ``corpus``; with one, Qwen2's pre-tokenizer split)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if corpus:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[kind],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + list(corpus), trainer)
    if kind == "llama":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    elif kind == "gemma":  # Gemma's tokenizer adds <bos> itself when asked for special tokens
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    elif kind == "r1":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["r1"][0], eos_token=SPECIALS["r1"][1])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if template:
        fast.chat_template = template
    out = Path(tempfile.mkdtemp(prefix=f"bft-tok-{kind}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    fast.save_pretrained(str(out))
    return str(out)


ZEPHYR_LIKE = ("{%- for m in messages %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{%- endfor %}"
               "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")


@functools.cache
def metaspace_tokenizer() -> str:
    """A sentencepiece-style tokenizer (Metaspace, '▁' prepended to the text's first piece, as Llama-2's and
    Mistral's fast tokenizers do) with a Zephyr-like template: a text tokenized alone gets a leading '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ZEPHYR_LIKE
    out = Path(tempfile.mkdtemp(prefix="bft-tok-metaspace-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    fast.save_pretrained(str(out))
    return str(out)


@functools.cache
def hf_tokenizer(name: str) -> str:
    """Directory of a tiny fast tokenizer: 'llama31', 'qwen25', 'rewriting', 'alternating', 'qwen_plain'
    (no template), 'dated' (writes today's date, as Llama-3.2's), ..."""
    spec = {"llama31": ("llama", LLAMA31_LIKE), "qwen25": ("qwen", QWEN25_LIKE),
            "rewriting": ("qwen", REWRITING), "qwen_plain": ("qwen", None), "alternating": ("qwen", ALTERNATING),
            "dated": ("qwen", "{{- '<|im_start|>system\\nToday Date: ' + strftime_now('%d %b %Y') + '<|im_end|>\\n' }}"
                              + QWEN25_LIKE),
            "thinking": ("qwen", THINKING), "qwen3": ("qwen", QWEN3_LIKE), "qwen3_strip": ("qwen", QWEN3_STRIP),
            "qwen15": ("qwen", QWEN15_LIKE),
            "role_tags": ("qwen", ROLE_TAGS), "r1": ("r1", R1_LIKE),
            "r1_newlines": ("r1", R1_LIKE, ("<think>\n\nHello",) * 40),  # '>\n\n' one token
            "mistral": ("qwen", MISTRAL_LIKE), "phi4": ("phi", PHI4_LIKE),
            "gemma3": ("gemma", GEMMA3_LIKE),
            "no_generation_prompt": ("qwen", QWEN25_LIKE.split("{%- if add_generation_prompt %}")[0]),
            "rewriting_hashes": ("qwen", REWRITING.replace("<|im_start|>", "### ").replace("<|im_end|>", " ###")),
            "hashes": ("qwen", "{%- for m in messages %}{{- '### ' + m['role'] + ':\\n' + m['content'] + ' ###\\n' }}"
                                "{%- endfor %}{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}"),
            "upper": ("qwen", QWEN25_LIKE.replace("message['content'] + '<|im_end|>",
                                                  "message['content']|upper + '<|im_end|>"))}[name]
    return _build_hf(*spec)


CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is microcephaly?"},
                  {"role": "assistant", "content": "A small head circumference."},
                  {"role": "user", "content": "Which genes?"},
                  {"role": "assistant", "content": "Many, for example ASPM."}]},
    {"instruction": "Define ataxia.", "input": "Answer in one sentence.", "output": "Poor coordination of movement."},
    {"prompt": "Hello, how are you?", "response": "Fine, thank you."},
    {"messages": [{"role": "user", "content": "Name a fox."},
                  {"role": "assistant", "content": "The quick brown fox."}]},
]


def write_jsonl(path: Path, records: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records] + (raw_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Chats of varied lengths (some long) for packing/loader/prepare tests."""
    import random

    rng = random.Random(seed)
    words = "the gene causes a phenotype with abnormal growth of the skull and ataxia".split()
    out = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(3, 120)))
        out.append({"messages": [{"role": "user", "content": f"Question {i}: tell me about item {i}."},
                                 {"role": "assistant", "content": f"Item {i}: {answer}."}]})
    return out


def prepare_dir(out: Path, records: list, **overrides) -> Path:
    """Prepare ``records`` (a jsonl next to ``out``) with the demo tokenizer; return the train split dir."""
    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import run

    src = write_jsonl(out.parent / f"{out.name}.jsonl", records)
    values = dict(train=[SourceConfig(path=str(src))], tokenizer=DEMO_SP, template="chatml", seq_length=256,
                  output_dir=str(out), num_workers=1)
    values.update(overrides)
    run(DataConfig(**values))
    return out / "train"


@contextlib.contextmanager
def logged(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Records of the ``bft_megatron`` loggers at ``level`` or above (they do not propagate to caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    root = logging.getLogger("bft_megatron")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def megatron_marker(directory: str, common: dict | None = None) -> None:
    """``directory`` with the two files megatron's save always writes, metadata.json and common.pt (holding
    ``common``, default empty; ``pointer.load_problem`` looks for both, the pre-flight reads common.pt)."""
    import torch
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    os.makedirs(directory, exist_ok=True)
    save_config(CheckpointingConfig("torch_dist"), directory)
    torch.save(common or {}, os.path.join(directory, "common.pt"))


def checkpoint_common(cfg, steps: int = 2, train_state: bool = True) -> dict:
    """The common part (common.pt) of a checkpoint that ``cfg`` saved after ``steps`` optimizer steps, as the
    pre-flight and the load read it: config, scheduler state, layout, and (not in an import) the train state."""
    from types import SimpleNamespace

    from bft_megatron.config import to_dict
    from bft_megatron.training.setup import build_scheduler

    groups = [{"max_lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "wd_mult": 1.0}]  # as megatron's optimizer's
    scheduler = build_scheduler(SimpleNamespace(param_groups=groups), cfg)
    scheduler.step(steps)
    common = {"scheduler": scheduler.state_dict(), "config": to_dict(cfg),
              "layout": {"tp": 1, "pp": 1, "vp": None, "cp": 1, "dp": 1, "world": 1}}
    if train_state:
        common["train_state"] = {"iteration": steps}
    return common
