"""Chat templates: the model's own Jinja template, rendered in Jinja's immutable sandbox.

Templates come from checkpoints people download; the sandbox refuses attribute access that
could reach Python internals (`__class__`, `__globals__`, ...), so a hostile template fails
with a one-line error instead of running code.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import ChatTemplateError


def _raise_exception(message):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    # HF's tojson keeps non-ASCII text as is (Jinja's default filter escapes it).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at the first unsafe attribute instead of yielding an
    Undefined that renders as an empty string."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is not allowed")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict] | None = None,
    **extra,
) -> str:
    """Render `messages` with a Jinja chat `template` in the sandbox.

    Args: the template text; OpenAI-style messages; whether to open the assistant's turn;
    the model's BOS/EOS token strings; optional tool definitions; extra template variables.
    Returns the prompt text (special tokens as text: encode it with parse_special=True).
    """
    env = _environment()
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=tools,
            **extra,
        )
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried to leave the sandbox ({e}); use a trusted template") from None
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template is broken ({e.__class__.__name__}: {e}); fix or replace it") from None
    except Exception as e:  # a template's own runtime errors (None + str, huge ranges, ...)
        raise ChatTemplateError(f"chat template failed on these messages ({e.__class__.__name__}: {e})") from None


def template_from_folder(folder: Path) -> str | None:
    """The chat template of an HF folder: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's `chat_template` (first named one when it is a list)."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ChatTemplateError(f"{path} is not valid JSON; fix or re-download it") from None
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value}
            value = named.get("default") or next(iter(named.values()), None)
        if value:
            return value
    return None


def render_with(
    template: str, tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> str:
    """Render `messages` (and OpenAI-style `tools`, as transformers passes them) with `template`
    and the BOS/EOS strings of `tokenizer`."""
    name = tokenizer.id_to_token
    return render(
        template,
        messages,
        add_generation_prompt,
        bos_token=name(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
        eos_token=name(tokenizer.eos_ids[0]) if tokenizer.eos_ids else "",
        tools=tools,
    )


def render_for(checkpoint, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with `checkpoint`'s own template and special-token strings."""
    template = checkpoint.chat_template()
    if not template:
        raise ChatTemplateError(f"{checkpoint.path} carries no chat template; use a raw prompt instead")
    return render_with(template, checkpoint.tokenizer(), messages, add_generation_prompt)
