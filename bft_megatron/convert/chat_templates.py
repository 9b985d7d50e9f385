"""Jinja chat templates that render exactly as the trainer's built-in templates (:mod:`bft_megatron.data.templates`).

An exported tokenizer without a chat template of its own gets the one its data was rendered with, so
``tokenizer.apply_chat_template`` gives the token ids the model was trained on. Each template also
closes assistant turns with a marker (:func:`end_of_turn` finds it; generation stops there).
"""

from __future__ import annotations

from bft_megatron.data.templates import EOT_CANDIDATES

__all__ = ["BUILTIN_JINJA", "end_of_turn"]

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# "Assistant: " opens every answer (as data/templates.py's plain), and is the generation prompt.
_PLAIN = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- else %}{{- 'Assistant: ' + message['content'] + eos_token }}"
    "{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
)
BUILTIN_JINJA = {"chatml": _CHATML, "llama3": _LLAMA3, "plain": _PLAIN}


def end_of_turn(template: str | dict | None) -> str | None:
    """The marker that closes assistant turns in ``template`` (None: none known, e.g. ``plain``'s eos).

    ``template`` may be a dict of named templates (transformers' ``chat_template`` with a ``tool_use`` one).
    """
    text = "\n".join(map(str, template.values())) if isinstance(template, dict) else template or ""
    return next((c for c in EOT_CANDIDATES if c in text), None)
