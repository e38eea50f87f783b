"""Chat conversations as text: Jinja chat templates, as Hugging Face tokenizers carry them.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
A chat template (the `chat_template` of a model's `tokenizer_config.json`, imported with its
weights into `sft.chat_template`, or written into the config) renders it as the text the model
reads. Models trained here from scratch use `DEFAULT_TEMPLATE`, which begins with the
begin-of-text token and ends each assistant turn with the end-of-text token, so generation stops
there. Nothing is added to what a template renders.

For training, a conversation becomes pieces of text, each marked whether the model learns it:
the assistant turns (with their end-of-turn marker) are learned, everything the template puts
around them is not. The pieces are found by rendering growing prefixes of the conversation, so
any template whose renderings of a prefix begin its renderings of the whole works.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message.role + '|>\\n' + message.content }}"
    "{% if message.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"sft.chat_template is not a valid Jinja template: {e}") from None


def render(template: str, messages: list[dict[str, str]], tok: TextTokenizer,
           add_generation_prompt: bool = False) -> str:
    """The text of a conversation (`template` empty: `DEFAULT_TEMPLATE`); with
    `add_generation_prompt`, followed by what opens the assistant's next turn."""
    names = tok.tokenizer.id_to_token
    try:
        return _compiled(template or DEFAULT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=names(tok.bos_id),
            eos_token=names(tok.eos_id), tools=None)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template failed on a conversation: {e}") from None


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` as a list of {role, content} with at least one assistant turn, or one error
    naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {k} must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": text}}; it is {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def pieces(template: str, messages: list[dict[str, str]], tok: TextTokenizer) -> list[tuple[str, bool]]:
    """The conversation's text as (text, learned) pieces: the assistant turns are learned."""
    out, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = render(template, messages[:k], tok, add_generation_prompt=True)
        whole = render(template, messages[:k + 1], tok)
        if not opened.startswith(done) or not whole.startswith(opened):
            raise UserError("the chat template renders a conversation's prefix differently from the "
                            "conversation itself, so its assistant turns cannot be found; "
                            "give sft.chat_template a template that only appends turns")
        out += [(opened[len(done):], False), (whole[len(opened):], True)]
        done = whole
    rest = render(template, messages, tok)[len(done):]
    return [(text, learned) for text, learned in [*out, (rest, False)] if text]


def prompt_ids(template: str, messages: list[dict[str, str]], tok: TextTokenizer) -> list[int]:
    """Token ids of a conversation that asks for the assistant's next turn, as generation reads
    them: the rendered text's tokens and nothing added (a template that wants BOS writes it, as
    Hugging Face's `apply_chat_template` assumes)."""
    return tok.encode(render(template, messages, tok, add_generation_prompt=True))
