"""Command line: one parser per subcommand, each calling a library function with the same arguments.

User errors (`LmforgeError`) print one line on stderr and exit 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError


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
        try:
            with open(args.file, encoding="utf-8", newline="") as f:
                text = f.read()
        except OSError as e:
            raise LmforgeError(f"cannot read {args.file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise LmforgeError(f"{args.file} is not UTF-8 text") from None
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong and where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Convert, run, serve and measure small language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a model's architecture, tensors and size")
    p.add_argument("model", help="known name (smollm2-135m), HF folder or .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tokenize", help="print token ids of a text as a JSON list")
    p.add_argument("model")
    p.add_argument("text", nargs="?")
    p.add_argument("--file", help="tokenize this UTF-8 file instead of TEXT")
    p.add_argument("--chat", action="store_true",
                   help="wrap the text as a user message in the model's chat template first")
    p.set_defaults(func=cmd_tokenize)
    return parser




def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` command; returns the exit code."""
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
