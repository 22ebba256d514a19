"""Chat templates rendered in the sandbox, against transformers' apply_chat_template."""

import pytest

from lmforge.chat import render, render_for
from lmforge.checkpoint import open_checkpoint
from lmforge.errors import ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! ✓"},
        {"role": "user", "content": "Name a prime."},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_template_matches_transformers(arch, conversation, tiny_factory):
    from transformers import AutoTokenizer

    folder = tiny_factory((arch, "float32", False, None))
    ref = AutoTokenizer.from_pretrained(folder)
    ckpt = open_checkpoint(folder)
    for gen in (True, False):
        ours = render_for(ckpt, conversation, add_generation_prompt=gen)
        assert ours == ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)


def test_default_model_prompt_tokens(default_model_path):
    ckpt = open_checkpoint(default_model_path)
    prompt = render_for(ckpt, CONVERSATIONS[0])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = ckpt.tokenizer().encode(prompt, parse_special=True)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2


def test_hf_template_globals():
    tpl = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if tools %}{{ tools | length }}{% endif %}{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    out = render(tpl, [{"role": "user", "content": "é"}], bos_token="<s>", tools=[{"name": "f"}])
    assert out == '<s>"é"14>'
    with pytest.raises(ChatTemplateError, match="refused the conversation: no system"):
        render("{{ raise_exception('no system') }}", [])


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ raise_exception.__globals__['os'].system('touch CANARY') }}",
    "{{ messages.__class__ }}",
    "{% set _ = messages.append({'role': 'user'}) %}x",
    "{{ self.__init__.__globals__.__builtins__.open('CANARY', 'w') }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_fail_and_execute_nothing(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render(template, [{"role": "user", "content": "hi"}])
    assert not (tmp_path / "CANARY").exists()
