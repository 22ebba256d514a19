"""Command line: one parser per subcommand, each calling a library function with the same arguments.

User errors (`LmforgeError`) print one line on stderr and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from lmforge.errors import LmforgeError, read_user_text
from lmforge.runtime.engine import ENGINES
from lmforge.speculative import DRAFT_MAX


def cmd_inspect(args) -> int:
    from lmforge.checkpoint import open_checkpoint

    summary = open_checkpoint(args.model).summary()
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_tokenize(args) -> int:
    from lmforge.checkpoint import open_checkpoint

    if args.file is not None:
        text = read_user_text(args.file)
    elif args.text is not None:
        text = args.text
    else:
        raise LmforgeError("give TEXT or --file PATH to tokenize")
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    if args.chat:
        from lmforge.chat import render_for

        prompt = render_for(ckpt, [{"role": "user", "content": text}])
        ids = tok.encode(prompt, add_special=False, parse_special=True)
    else:
        ids = tok.encode(text)
    print(json.dumps(ids))
    return 0


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lmforge")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong and where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_convert(args) -> int:
    from lmforge.export.targets import TARGETS

    if args.list_targets:
        for t in TARGETS.values():
            print(f"{t.name:<12} {t.provider:<5} {t.dtype:<8} {t.description}")
        return 0
    if not args.source or not args.output:
        raise LmforgeError("give SOURCE and -o OUT (or --list-targets)")
    if args.gguf:
        from lmforge.export.gguf import convert_to_gguf

        print(convert_to_gguf(args.source, args.output, args.gguf, force=args.force, requantize=args.requantize))
        return 0
    if args.hf:
        from lmforge.export.hf import convert_to_hf

        print(convert_to_hf(args.source, args.output, force=args.force))
        return 0
    from lmforge.export.convert import convert

    out = convert(
        args.source,
        args.output,
        target=args.target,
        force=args.force,
        quant=args.quant,
        block_size=args.block_size,
        symmetric=args.symmetric,
        accuracy_level=args.accuracy_level,
        requantize=args.requantize or None,
        calibration=args.calibration,
        head_bits=args.head_bits,
    )
    print(out)
    return 0


def _sampling(args) -> dict:
    """The sampling options of `run`/`chat` under SamplingParams' names."""
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias or ()),
        seed=args.seed,
        stop=tuple(args.stop or ()),
        json_schema=read_user_text(args.json_schema, "JSON schema") if args.json_schema else None,
        regex=args.regex,
        grammar=read_user_text(args.grammar, "grammar") if args.grammar else None,
    )


def _logit_bias(text: str) -> tuple[int, float]:
    """TOKEN_ID=BIAS, or llama.cpp's TOKEN_ID+BIAS / TOKEN_ID-BIAS."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:=\s*([+-]?[\d.]+(?:e[+-]?\d+)?)|([+-][\d.]+(?:e[+-]?\d+)?))\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS (e.g. 2=-100)")
    return int(m.group(1)), float(m.group(2) or m.group(3))


def _stats(model, verbose: bool = False) -> str:
    r = model.last
    if r is None:
        return ""
    line = (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} tokens, "
        f"{r.generation_tps:.1f} tok/s | time to first token: {r.ttft * 1000:.0f} ms"
    )
    if verbose:
        spec = model.speculation
        line += "\n" + (spec.stats.summary() if spec is not None else "speculative: off (plain decoding)")
        if model.prefix is not None:
            line += f"\nprefix reuse: {model.prefix.reused} prompt tokens from the last call's cache"
    return line


def _prompt(args) -> str:
    """-p TEXT, --file PATH, or the standard input for `-p -` or when it is piped and neither is given."""
    if getattr(args, "file", None) is not None:
        return read_user_text(args.file, "prompt file")
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if args.prompt is None:
        raise LmforgeError("give the prompt with -p TEXT or --file PATH, or pipe it in (-p - reads the standard input)")
    return args.prompt


def cmd_run(args) -> int:
    from lmforge.model import load
    from lmforge.prompt_cache import check_writable, load_prompt_cache, save_prompt_cache

    prompt = _prompt(args)
    cache_file = check_writable(args.prompt_cache) if args.prompt_cache is not None else None  # before any work
    model = load(
        args.model,
        device=args.device,
        target=args.target,
        threads=args.threads,
        engine=args.engine,
        **_speculative(args),
    )
    if cache_file is not None:
        load_prompt_cache(model, cache_file, len(model.prompt_ids(prompt, raw=args.raw)) + args.max_tokens)
    running = f"lmforge: running {args.model} as {model.form}"
    try:  # said with the first piece: an error before it (a prompt too long, ...) stays one line
        for piece in model.stream(prompt, raw=args.raw, **_sampling(args)):
            if running:
                print(running, file=sys.stderr, flush=True)
                running = ""
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    if running:
        print(running, file=sys.stderr)
    sys.stdout.write("\n")
    print(_stats(model, args.verbose), file=sys.stderr)
    if cache_file is not None:
        saved = save_prompt_cache(model, cache_file)
        if args.verbose and model.last is not None:
            reused, whole = model.prefix.reused, model.last.prompt_tokens
            print(f"prompt cache: reused {reused} of {whole} tokens from {cache_file}; saved {saved}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from lmforge.model import has_chat_template, load

    if not has_chat_template(args.model):  # before loading (or converting) it
        hint = f"continue a text with `lmforge run {args.model} -p TEXT`"
        raise LmforgeError(f"{args.model} has no chat template, so it cannot chat; {hint}")
    model = load(
        args.model,
        device=args.device,
        target=args.target,
        threads=args.threads,
        engine=args.engine,
        **_speculative(args),
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    print(f"lmforge: running {args.model} as {model.form}", file=sys.stderr)
    print("lmforge chat: /reset clears the conversation, /exit quits; Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(type /exit to quit)")
            continue
        if line.strip() in ("/exit", "/quit", "/bye"):
            return 0
        if line.strip() == "/reset":
            history = list(system)
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.stream_chat(history, **_sampling(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except LmforgeError as e:  # e.g. the history outgrew the context: keep the session
            history.pop()
            print(f"lmforge: error: {e} (/reset starts over)", file=sys.stderr)
            continue
        print()
        if args.verbose:
            print(_stats(model, True), file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_pull(args) -> int:
    from lmforge.checkpoint import resolve

    print(resolve(args.model))
    return 0


def cmd_models(args) -> int:
    from lmforge.store import models_report

    print(models_report(as_json=args.json))
    return 0


def cmd_rm(args) -> int:
    from lmforge.store import remove

    for line in remove(args.target):
        print(line)
    return 0


def cmd_eval_ppl(args) -> int:
    from lmforge.evaluate import perplexity

    rows = []
    for m in args.models:
        r = perplexity(m, data=args.data, ctx=args.ctx, chunks=args.chunks, target=args.target, threads=args.threads)
        rows.append({"model": m, **r.to_dict()})
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    else:
        width = max(len(r["model"]) for r in rows)
        print(f"{'model':<{width}}  {'ppl':>9}  tokens scored  chunks  seconds  engine")
        for r in rows:
            print(
                f"{r['model']:<{width}}  {r['ppl']:9.4f}  {r['tokens_scored']:>13}  {r['chunks']:>6}  {r['seconds']:>7}"
                f"  {r['engine']}"
            )
    return 0


def cmd_eval_kld(args) -> int:
    from lmforge.evaluate import kl_divergence

    r = kl_divergence(
        args.model,
        args.ref,
        data=args.data,
        ctx=args.ctx,
        chunks=args.chunks,
        target=args.target,
        threads=args.threads,
        ref_target=args.ref_target,
    )
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(
            f"KL divergence: mean {r.mean:.6f}, 99th percentile {r.p99:.6f} | same top token {100 * r.same_top:.2f}% | "
            f"ppl {r.ppl:.4f} (ref {r.ref_ppl:.4f}) | {r.tokens_scored} tokens, {r.chunks} chunks | "
            f"engines: {r.engine} (ref {r.ref_engine})"
        )
    return 0


def cmd_devices(args) -> int:
    from lmforge.devices import describe, devices

    info = devices()
    print(json.dumps(info) if args.json else describe(info))
    return 0


def cmd_recommend(args) -> int:
    from lmforge.recommend import recommend

    r = recommend(args.model, args.memory, args.context)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"budget {r['budget_bytes'] / 2**30:.1f} GiB, context {r['context']} tokens")
    for f in r["forms"]:
        mark = "->" if f["target"] == r["recommended"] else ("  " if f["fits"] else " x")
        print(f"{mark} {f['target']:<11} {f['memory_bytes'] / 2**30:6.2f} GiB  {f['speed']:<12} {f['quality']}")
        if f["ruled_out"]:
            print(f"   {'':<11} ruled out: {f['ruled_out']}")
    print(r["command"])
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from lmforge.bench import bench, plot, table

    vs = tuple(v for v in (args.vs or "").split(",") if v)
    if args.plot and not Path(args.plot).expanduser().resolve().parent.is_dir():
        raise LmforgeError(f"the folder of --plot {args.plot} does not exist")
    counts = (args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads)
    rows = bench(args.models, *counts, vs, args.target, args.rounds, prompt=args.prompt, **_speculative(args))
    print(json.dumps(rows) if args.json else table(rows, "csv" if args.csv else "md" if args.md else "text"))
    sys.stdout.flush()
    if args.plot:
        plot(rows, args.plot)
    failed = [r["runner"] for r in rows if "error" in r]
    if failed:
        print(f"lmforge: error: {', '.join(failed)} could not be measured (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_batch(args) -> int:
    from lmforge.batch import run_batch

    counts = run_batch(
        args.model,
        args.input,
        args.output,
        target=args.target,
        ray=args.ray,
        workers=args.workers,
        **_speculative(args),
    )
    print(
        f"batch: {counts['ran']} generated, {counts['errors']} bad lines recorded, {counts['already_done']} done "
        f"before, {counts['duplicates']} duplicate ids skipped",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args) -> int:
    from lmforge.server.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_tokens_limit=args.max_tokens_limit,
        engine=args.engine,
        device=args.device,
        target=args.target,
        threads=args.threads,
        name=args.name,
        allowed_hosts=tuple(args.allowed_host),
        cors_origins=tuple(args.cors_origin),
        shutdown_grace_s=args.shutdown_grace,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        kv_budget_mb=args.kv_budget_mb,
        spin=args.spin,
        **_speculative(args),
        prefix_cache_mb=args.prefix_cache_mb,
    )
    return 0


def _add_speculative_args(p) -> None:
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft", "off"],
        help="draft tokens and verify them in one pass: ngram (prompt lookup; the default where the engine "
        "can verify), draft (a draft model, --draft), off",
    )
    p.add_argument("--draft", metavar="MODEL", help="draft model with the same vocabulary (any form lmforge runs)")
    p.add_argument("--draft-max", type=int, default=DRAFT_MAX, metavar="N", help="most tokens drafted per step")


def _speculative(args) -> dict:
    """load()'s speculation arguments from the flags."""
    return dict(speculative=args.speculative, draft=args.draft, draft_max=args.draft_max)


def _add_generation_args(p) -> None:
    p.add_argument("model", help="known name, HF folder, .gguf file, or an ONNX folder lmforge wrote")
    _add_speculative_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="also print speculative decoding's acceptance")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument(
        "--repetition-penalty", "--repeat-penalty", type=float, default=1.0, help="over the last 64 tokens; 1 is off"
    )
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens")
    p.add_argument(
        "--logit-bias",
        type=_logit_bias,
        action="append",
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit; repeatable",
    )
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT; repeatable")
    p.add_argument("--seed", type=int)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json-schema", metavar="FILE", help="the output follows this JSON Schema (a .json file)")
    out.add_argument("--regex", metavar="R", help="the output matches this regular expression")
    out.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar (llguidance's dialect)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "dml"])
    p.add_argument("--target", help="preset used when MODEL must be converted first (default: cpu-int4 on the CPU)")
    p.add_argument("--threads", type=int, help="ONNX Runtime / llama.cpp threads (default: all cores)")
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", *ENGINES],
        help="auto (default): llama.cpp for a .gguf file when llama-cpp-python is installed, else ONNX Runtime",
    )


def _add_eval_args(p) -> None:
    p.add_argument(
        "--data", help="UTF-8 text (default: WikiText-2 test, fetched once from the Hub as llama.cpp's scripts do)"
    )
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    p.add_argument("--chunks", type=int, help="score at most this many windows")
    p.add_argument("--target", help="preset used when MODEL must be converted first (default: cpu-fp32)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's architecture, tensors and size")
    p.add_argument("model", help="known name (smollm2-135m), HF folder or .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def _tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="print token ids of a text as a JSON list")
    p.add_argument("model")
    p.add_argument("text", nargs="?")
    p.add_argument("--file", help="tokenize this UTF-8 file instead of TEXT")
    p.add_argument(
        "--chat", action="store_true", help="wrap the text as a user message in the model's chat template first"
    )
    p.set_defaults(func=cmd_tokenize)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to an ONNX folder, a GGUF file or an HF folder")
    p.add_argument("source", nargs="?", help="known name, HF folder or .gguf file")
    p.add_argument("-o", "--output", help="output folder (written atomically)")
    p.add_argument("--target", default="cpu-fp32", help="preset (see --list-targets)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--quant", choices=["rtn", "awq"], help="override the preset's quantization (adds it to a float preset)"
    )
    p.add_argument("--block-size", type=int, help="quantization block size: a power of two >= 16")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_true",
        default=None,
        help="codes around an implicit zero point (default)",
    )
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="an integer zero point per block")
    p.add_argument(
        "--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="MatMulNBits accuracy_level (4: int8 activations)"
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="GGUF input: dequantize and quantize again instead of exact transcoding; with --gguf, choose each "
        "tensor's type afresh even when the source already is that file type",
    )
    p.add_argument(
        "--head-bits",
        type=int,
        choices=[4, 8],
        help="bits of a quantized output head / tied embedding (default 8; 4 as onnxruntime-genai's builder)",
    )
    p.add_argument("--calibration", help="AWQ calibration text file (default: Python's own documentation)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--hf", action="store_true", help="write an HF folder (config.json + fp32 safetensors) instead")
    form.add_argument(
        "--gguf",
        metavar="TYPE",
        help="write a GGUF file for llama.cpp instead: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_m q5_k_m q6_k",
    )
    p.add_argument("--list-targets", action="store_true", help="list the presets and exit")
    p.set_defaults(func=cmd_convert)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="generate from a prompt, streaming text to stdout and stats to stderr")
    _add_generation_args(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="the prompt; - (or a pipe and no -p) reads it from the standard input")
    prompt.add_argument("--file", metavar="PATH", help="read the prompt from this UTF-8 text file")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as text")
    p.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="reuse the KV of the longest token prefix shared with the prompt saved in FILE, and save this run's",
    )
    p.set_defaults(func=cmd_run)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure quality")
    ev = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    p = ev.add_parser("ppl", help="perplexity with llama.cpp's llama-perplexity protocol")
    p.add_argument("models", nargs="+", metavar="MODEL")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("kld", help="KL divergence of MODEL's next-token distributions from REF's")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ref", required=True, help="the reference model (e.g. the fp32 form)")
    p.add_argument("--ref-target", help="preset used when REF must be converted first (default: cpu-fp32)")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval_kld)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed, load time, memory and size, beside peers")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=5, help="measured runs per runner process, after a warm-up")
    p.add_argument(
        "--rounds", type=int, default=1, help="interleave the runners this many times (fresh processes; figures pooled)"
    )
    p.add_argument("--threads", type=int)
    p.add_argument("--target", default="cpu-int4", help="preset for MODELs that must be converted first")
    p.add_argument("--vs", help="peers measured on the first MODEL: llamacpp,ortgenai")
    p.add_argument(
        "--prompt",
        choices=["text", "grounded"],
        default="text",
        help="text: English help text (default); grounded: a code-editing request whose answer quotes it",
    )
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft", "off"],
        default="off",
        help="also measure lmforge decoding with speculation (a row per form): ngram, draft (--draft), off (default)",
    )
    p.add_argument("--draft", metavar="MODEL", help="draft model for --speculative draft (same vocabulary)")
    p.add_argument("--draft-max", type=int, default=DRAFT_MAX, metavar="N", help="most tokens drafted per step")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--md", action="store_true")
    p.add_argument("--plot", metavar="PATH.png", help="bar chart of the table (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def _batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="JSONL requests in, JSONL results out; resumable; --ray for a cluster")
    p.add_argument("model")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    p.add_argument("--target", help="preset used when MODEL must be converted first (default: cpu-int4 on the CPU)")
    p.add_argument("--workers", type=int, default=1, help="engines (Ray actors) with --ray")
    _add_speculative_args(p)
    p.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="run on Ray: a local instance, or the cluster at ADDRESS",
    )
    p.set_defaults(func=cmd_batch)


def _machine_parsers(sub) -> None:
    p = sub.add_parser("devices", help="execution providers, GPUs, CPU features, memory, llama.cpp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("recommend", help="the form of MODEL that fits this machine, and the command to make it")
    p.add_argument("model")
    p.add_argument("--memory", type=float, help="memory budget in GiB (default: what is available now)")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to plan for")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with history (/reset, /exit)")
    _add_generation_args(p)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation (kept by /reset)")
    p.set_defaults(func=cmd_chat)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    p.add_argument("model", help="known name, HF folder, .gguf file, or an ONNX folder lmforge wrote")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LMFORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LMFORGE_API_KEY)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (ONNX Runtime on the CPU)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="cap on a request's max_tokens")
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", *ENGINES],
        help="auto (default): llama.cpp for a .gguf file when llama-cpp-python is installed (one request at a "
        "time), else ONNX Runtime (continuous batching)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "dml"])
    p.add_argument("--target", help="preset used when MODEL must be converted first (default: cpu-int4 on the CPU)")
    p.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    p.add_argument("--name", help="the model id clients send (default: MODEL's name)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="accept requests whose Host is NAME (repeatable; '*' for any); the loopback names, the --host name "
        "and IP addresses are always accepted: other names are refused against DNS rebinding",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (http://host[:port], repeatable, '*' for any) call the API (CORS); "
        "default: no cross-site calls",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM/Ctrl-C, seconds running replies get to finish before they end with an error event "
        "(default: 10)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        help="connections open at once; more are closed (default: from the open-file limit)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's headers before it is disconnected (default: 10)",
    )
    p.add_argument(
        "--kv-budget-mb",
        type=int,
        help="KV cache memory the batching server may hold, in MiB (default: room for every batch row and one "
        "full-context sequence); longer requests wait for room or get a 400",
    )
    _add_speculative_args(p)
    p.add_argument(
        "--spin",
        default="auto",
        choices=["auto", "sleep", "spin"],
        help="how ONNX Runtime's threads wait: sleep, spin within each pass, or auto (default: a second session "
        "of a model up to 1 GiB, decoding on whichever of the two measures faster as the machine's load changes)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        help="memory for KV blocks of recent prompts, in MiB, beside --kv-budget-mb (default 256; 0: off): a "
        "prompt that starts like a recent one (a shared system prompt, the next turn of a chat) prefills only the rest",
    )
    p.set_defaults(func=cmd_serve)


def _store_parsers(sub) -> None:
    p = sub.add_parser("pull", help="download MODEL (a catalogue name or Hub id) into the Hub cache, no conversion")
    p.add_argument("model", help="catalogue name, ORG/NAME[@REV], ORG/NAME:QUANT, ORG/NAME/FILE.gguf, ORG/NAME:FOLDER")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("models", help="the catalogue, what is downloaded, and the converted forms in the cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("rm", help="remove a converted form, or a model's download and its forms")
    p.add_argument("target", metavar="MODEL_OR_FORM", help="a form from `lmforge models`, a catalogue name or Hub id")
    p.set_defaults(func=cmd_rm)


# in `lmforge --help` order
SUBCOMMAND_PARSERS = (
    _inspect_parser,
    _tokenize_parser,
    _convert_parser,
    _run_parser,
    _eval_parser,
    _bench_parser,
    _batch_parser,
    _machine_parsers,
    _chat_parser,
    _serve_parser,
    _store_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    """The `lmforge` parser: global flags, then one subparser per command."""
    parser = _Parser(prog="lmforge", description="Convert, run, serve and measure small language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"lmforge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMAND_PARSERS:
        add(sub)
    return parser


class _LineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"lmforge: {record.levelname.lower()}: {record.message}"


class _StderrHandler(logging.Handler):
    """The library's warnings (loggers under "lmforge") as the CLI's own lines: `lmforge: warning: ...`."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(_LineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)  # sys.stderr as it is now, not at install
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)


def show_library_warnings() -> None:
    """Print the library's log records of level WARNING and above on stderr (once per process)."""
    logger = logging.getLogger("lmforge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` command; returns the exit code."""
    parser = build_parser()
    show_library_warnings()
    args, extra = parser.parse_known_args(argv)
    # argparse binds an optional positional before a later flag (`tokenize M --chat TEXT`)
    if len(extra) == 1 and getattr(args, "text", False) is None and not extra[0].startswith("-"):
        args.text = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except LmforgeError as e:
        if args.debug:
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge run ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
