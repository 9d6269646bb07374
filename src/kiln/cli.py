"""The `kiln` command: one subcommand per verb, each a thin layer over the library.

User mistakes (KilnError) print one line on stderr and exit 2; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable

from kiln import __version__
from kiln.errors import KilnError

DEFAULTS = {"max_tokens": 256, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-m", "--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _sampling() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"], help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy")
    g.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus mass kept (1 = off)")
    g.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="most likely tokens kept (0 = off)")
    g.add_argument("--min-p", type=float, default=DEFAULTS["min_p"], help="drop tokens below min-p x top (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute precision")
    return p


def _params(args: argparse.Namespace):  # noqa: ANN202 (the import stays lazy)
    from kiln.engine.sampler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def cmd_info(args: argparse.Namespace) -> int:
    from kiln.model.info import describe, format_json, format_text

    info = describe(args.model)
    print(format_json(info) if args.json else format_text(info))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.engine.generate import Generator
    from kiln.model.load import load

    params = _params(args)  # validate before the (slow) load
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    loaded = load(args.model, precision=args.dtype)
    tok = loaded.tokenizer
    if args.raw or not tok.has_chat_template:
        if not args.raw:
            print("kiln: note: the model has no chat template; sending the prompt as raw text",
                  file=sys.stderr)
        prompt = tok.encode(prompt_text)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tok.encode_chat([*messages, {"role": "user", "content": prompt_text}])

    def stream(_row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    out = Generator(loaded.model, tok).generate([prompt], params, on_text=None if args.json else stream)[0]
    if args.json:
        print(json.dumps({
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "finish_reason": out.finish_reason,
            "ttft_ms": round(out.ttft_ms, 2),
            "prefill_tokens_per_s": round(out.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(out.decode_tokens_per_s, 2),
        }))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kiln.chat import ChatSession, run_repl
    from kiln.model.load import load

    params = _params(args)
    loaded = load(args.model, precision=args.dtype)
    return run_repl(ChatSession(loaded, params, system=args.system))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Plan, compress, evaluate and serve language models on the hardware you have."
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    common, sampling = _common(), _sampling()

    p = sub.add_parser("info", parents=[common], help="describe a model: architecture, sizes, sha256")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", parents=[common, sampling], help="complete one prompt")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and timings")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[common, sampling], help="talk to a model interactively")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KilnError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"kiln: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
