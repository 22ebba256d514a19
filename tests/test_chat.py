"""Chat templates rendered in the sandbox, against transformers' apply_chat_template."""

import pytest

from lmforge.chat import RenderLimits, render, render_for
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


# ---- limits: a template's render is bounded in time and memory ---------------------------------

NS = "{% set ns = namespace(s='ab', x=[]) %}"
HOSTILE = {  # each would run for minutes or take gigabytes without the limits
    "string times 2e9": "{{ 'a' * 2000000000 }}",
    "list times 1e9": "{{ ([1] * 10**9)|length }}",
    "lipsum n=1e7": "{{ lipsum(n=10**7) }}",
    "lipsum long paragraphs": "{{ lipsum(n=10000, min=1000, max=1000) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops writing": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "range 1e9": "{{ range(10**9)|list|length }}",
    "doubling with ~": NS + "{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": NS + "{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling in a block set": NS + "{% for i in range(60) %}{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}"
    "{% set ns.s = t %}{% endfor %}",
    "doubling in a macro": "{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}"
    + NS
    + "{% for i in range(60) %}{% set ns.s = d(ns.s) %}{% endfor %}",
    "slices piling up": "{% set s = 'a' * 4000000 %}" + NS + "{% for i in range(99999) %}"
    "{% set ns.x = ns.x + [s[i:]] %}{% endfor %}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "format fields": "{{ ('{:>90000}' * 2000).format(*range(2000)) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "format filter width": "{{ '%0999999999d'|format(1) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "center filter": "{{ 'x'|center(10**9) }}",
    "indent filter": "{{ ('\n' * 90000)|indent(90000)|length }}",
    "expandtabs": "{{ ('\t' * 90000).expandtabs(90000)|length }}",
    "big power": "{{ 10**(10**8) }}",
    "squaring loop": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "replace on empty": "{% set ns = namespace(s='a' * 1000) %}{% for i in range(9) %}"
    "{% set ns.s = ns.s.replace('', ns.s) %}{% endfor %}",
    "join a string with itself": "{% set s = 'a' * 100000 %}{{ (s|list)|join(s)|length }}",
    "sum of lists": "{{ ([[1] * 1000] * 1000)|sum(start=[])|length }}",
    "tojson indent": "{{ messages|tojson(indent=10**6) }}",
    "recursive macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    # past the size checks (values counted after they exist, lists by items): the worker's memory cap
    "list of big strings": "{% set x = 'x' * 4000000 %}{{ [x] * 100 }}",
    "tojson of big strings": "{% set x = 'x' * 4000000 %}{{ ([x] * 100)|tojson }}",
    "str.format repeats an argument": "{% set x = 'x' * 4000000 %}{{ ('{0}' * 100).format(x) }}",
    "percent with a mapping": "{% set x = 'x' * 4000000 %}{{ ('%(a)s' * 100) % {'a': x} }}",
    "format filter with a mapping": "{% set x = 'x' * 4000000 %}{{ ('%(a)s' * 100)|format(a=x) }}",
    "percent star width": "{{ '%*s' % (400000000, 'x') }}",
    "join over a generator": "{{ (range(5000)|map('string'))|join('x' * 80000) }}",
    "tojson indent on a long list": "{{ range(4000)|list|tojson(indent=99999) }}",
    "indent by a string": "{{ ('a\n' * 5000)|indent('x' * 80000, blank=True) }}",
    # within every size check (each string under 4M characters, 780M made in all): the memory cap
    "many big strings kept": "{% set ns = namespace(x=[]) %}{% for i in range(200) %}"
    "{% set ns.x = ns.x + ['x' * 3900000 ~ i] %}{% endfor %}{{ ns.x|length }}",
    # a generator's cleanup raising in a trace hook switched the old in-thread deadline off for good
    "deadline in a generator's cleanup": "{% set A = range(100000)|list * 40 %}{% set L = range(100000)|list %}"
    "{% for _ in [0] %}{% set t = range(2)|map('string') %}{% for x in t %}{% break %}{% endfor %}"
    "{% set t = " + " or ".join(["(-1 in A)"] * 100) + " %}"
    "{% for i in L %}{% for j in L %}{% endfor %}{% endfor %}done{% endfor %}",
}


def _worker_peak() -> int:
    """The largest peak resident size of the live render workers, in bytes."""
    from lmforge import chat

    peaks = [0]
    for worker in chat._POOL.workers:
        if worker.process is not None and worker.process.poll() is None:
            with open(f"/proc/{worker.process.pid}/status") as status:
                peaks += [int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM:")]
    return max(peaks)


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_stops_within_its_limits(template):
    import time
    import tracemalloc

    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(ChatTemplateError, match="over its limit|to render") as e:
            render(template, CONVERSATIONS[0])
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]  # in this process
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value)
    assert took < 2.0, took
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB"
    assert _worker_peak() < 256 + 160 << 20, f"{_worker_peak() / 2**20:.0f} MiB"  # 256 over its ~100 MiB start
    assert render("{{ messages[0].content }}", CONVERSATIONS[0]) == CONVERSATIONS[0][0]["content"]  # still renders


def test_long_conversation_built_by_concatenation_renders():
    """A template building the prompt with `text + ...` over a 1 MB conversation makes ~500 MB of
    temporaries; it renders (the memory cap bounds what is alive, not what was ever made)."""
    template = (
        "{% set ns = namespace(text='') %}{% for m in messages %}"
        "{% set ns.text = ns.text + '<|' + m.role + '|>' + m.content + '\\n' %}{% endfor %}{{ ns.text }}"
    )
    messages = [{"role": "user", "content": "x" * 1000} for _ in range(1000)]
    limits = RenderLimits(timeout_s=10)  # the loaded test machine; the point is the total, not the time
    assert render(template, messages, limits=limits) == "".join(f"<|user|>{m['content']}\n" for m in messages)


def test_a_hostile_render_does_not_hold_up_others():
    """Renders run in RENDER_WORKERS processes: with one hostile render running, an ordinary one
    still finishes at once, and the hostile one's worker is replaced."""
    import threading
    import time

    from lmforge import chat

    assert chat.RENDER_WORKERS >= 2
    errors = []

    def hostile():
        try:
            render(HOSTILE["nested loops"], CONVERSATIONS[0])
        except ChatTemplateError as e:
            errors.append(str(e))

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert render("{{ messages|length }}", CONVERSATIONS[1]) == "4"
    assert time.monotonic() - start < 0.5
    thread.join()
    assert errors and "to render" in errors[0]


ORDINARY = [  # templates within the limits render exactly as Jinja's own sandbox renders them
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{{ bos_token }}{% for m in messages %}{{ (m.role ~ ': ' ~ m.content)|trim|indent(2) }}{{ '%-8s|' % m.role }}"
    "{{ '{:>6}'.format(loop.index) }}{{ m.content[:5] }}{{ m.content[::-1] }}{% endfor %}{{ eos_token * 3 }}",
    "{% set ns = namespace(parts=[]) %}{% for m in messages %}{% set ns.parts = ns.parts + [m.content|upper] %}"
    "{% endfor %}{{ ns.parts|join(' / ') }}{{ messages|length }}{{ messages[0]|dictsort }}"
    "{{ range(5)|sum }}{{ 2 ** 10 }}"
    "{{ ['a', 'b']|map('upper')|list }}",
]


@pytest.mark.parametrize("template", ORDINARY)
def test_ordinary_templates_render_as_jinja_does(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for conversation in CONVERSATIONS:
        got = render(template, conversation, bos_token="<s>", eos_token="</s>")
        want = env.from_string(template).render(
            messages=conversation, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", tools=None
        )
        assert got == want


def test_render_workers_are_not_interrupted_by_ctrl_c():
    """A terminal's Ctrl-C is the CLI's (`lmforge chat` stops an answer): the worker neither dies
    of it nor prints a traceback, and runs in a session of its own (the terminal does not signal it)."""
    import os
    import signal

    from lmforge import chat

    assert render("{{ 1 + 1 }}", []) == "2"
    workers = [w.process for w in chat._POOL.workers if w.process is not None]
    for process in workers:
        assert os.getsid(process.pid) != os.getsid(0)
        os.kill(process.pid, signal.SIGINT)
    assert [render("{{ 2 + 2 }}", []) for _ in workers] == ["4"] * len(workers)
    assert all(process.poll() is None for process in workers)
