"""The `kiln` command: one subcommand per verb, each a thin layer over the library.

User mistakes (KilnError) print one line on stderr and exit 2; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.engine import RUNTIME_HELP, RUNTIMES
from kiln.errors import ContextLengthError, Interrupted, InvalidParameterError, KilnError, ModelFormatError
from kiln.files import is_stream

DEFAULT_SPECULATE = 4  # --draft: tokens the draft proposes per step
DEFAULT_MAX_TOKENS = 256  # generate and chat, when --max-tokens is not given
DEFAULTS = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}



KV_CACHE_HELP = "KV cache storage: the model's dtype, or int8 with a scale per token and head (~3.8x the tokens)"

def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-m", "--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _sampling() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS}, cut at the end of the model's "
                        "context)")
    g.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy")
    g.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus mass kept (1 = off)")
    g.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="most likely tokens kept (0 = off)")
    g.add_argument("--min-p", type=float, default=DEFAULTS["min_p"], help="drop tokens below min-p x top (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (a signed 64-bit integer)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="hold the output to a JSON schema: inline JSON or a .json file ('{\"type\": \"object\"}': any "
                        "JSON object)")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute precision")
    return p


def _params(args: argparse.Namespace):  # noqa: ANN202 (the import stays lazy)
    from kiln.engine.sampler import MAX_SEED, MIN_SEED, SamplingParams

    if args.seed is not None and not MIN_SEED <= args.seed <= MAX_SEED:
        raise InvalidParameterError(f"--seed {args.seed} is out of range; it must be in [-2**63, 2**63 - 1], as the "
                                    "server's seed")
    try:
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            grammar=_json_schema_grammar(args.json_schema),
        )
    except InvalidParameterError as exc:  # worded with the field's name; the user typed the flag
        if exc.param is None:
            raise
        flag = "--" + exc.param.replace("_", "-")
        raise InvalidParameterError(str(exc).replace(f"{exc.param}=", f"{flag} ", 1)) from None


def _json_schema_grammar(value: str | None) -> str | None:
    """--json-schema: inline JSON or a file's path, compiled to the grammar the sampler follows."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            if _is_json(value):  # inline JSON that is not an object ('[]', 'true'): refused as that below
                return _schema_grammar(value)
            raise InvalidParameterError(f"--json-schema {value!r} is neither inline JSON nor a readable file "
                                        f"({exc.strerror}); pass a schema such as '{{\"type\": \"object\"}}'") from None
    return _schema_grammar(text)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _schema_grammar(text: str) -> str:
    from kiln.engine.grammar import json_grammar

    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"--json-schema is not valid JSON ({exc.msg} at line {exc.lineno} column "
                                    f"{exc.colno}); fix it") from None
    except RecursionError:  # hundreds of levels: past what the JSON reader (and the grammar compiler) can nest
        raise InvalidParameterError("--json-schema nests too deeply to be read; flatten it, naming repeated parts "
                                    "in $defs and pointing at them with $ref") from None
    if not isinstance(schema, dict):
        raise InvalidParameterError("--json-schema must be a JSON object (a schema); '{\"type\": \"object\"}' "
                                    "allows any JSON object")
    return json_grammar(schema)


def cmd_info(args: argparse.Namespace) -> int:
    from kiln.model.info import describe, format_json, format_text

    info = describe(args.model)
    print(format_json(info) if args.json else format_text(info))
    return 0


def _runtime_model(loaded: object, runtime: str, kv_cache: str = "model") -> Any:
    """The model the engine calls; under an ONNX Runtime session kiln's copy of the weights is let go (the
    command needs only the tokenizer and config), so a process holds one copy, as kiln serve does."""
    from kiln.engine.onnx_runtime import pick_runtime

    return pick_runtime(loaded, runtime, kv_cache, keep_weights=False)[0]  # type: ignore[arg-type]


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.engine.generate import Generator
    from kiln.model.load import load

    params = _params(args)  # validate before the (slow) load
    _check_generate_flags(args)
    if args.draft is not None:
        _check_speculative(args, params)
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.raw and not prompt_text.strip():  # the chat template would wrap a blank message and run anyway
        raise InvalidParameterError("the prompt is empty; pass some text" + (" on stdin" if args.prompt == "-" else ""))
    loaded = load(args.model, precision=args.dtype)
    tok = loaded.tokenizer
    if args.raw or not tok.has_chat_template:
        if not args.raw:
            print("kiln: note: the model has no chat template; sending the prompt as raw text",
                  file=sys.stderr)
        prompt = tok.encode(prompt_text)
    else:
        from kiln.chat import system_messages

        prompt = tok.encode_chat([*system_messages(args.system), {"role": "user", "content": prompt_text}])
    _check_room(len(prompt), args.max_tokens, loaded.spec.max_position)

    line_open = [False]  # streamed text whose line is not ended yet

    def stream(_row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()
        line_open[0] = not delta.endswith("\n")

    model = _runtime_model(loaded, args.runtime, args.kv_cache)
    drafter = _load_drafter(args, loaded, model) if args.draft is not None else None
    generator = Generator(model, tok, kv_cache=args.kv_cache, drafter=drafter)
    try:
        out = generator.generate([prompt], params, on_text=None if args.json else stream)[0]
    except KeyboardInterrupt:
        if line_open[0]:  # end the streamed text's line: "kiln: interrupted" was glued to its last word
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    if args.json:
        result = {
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "finish_reason": out.finish_reason,
            "ttft_ms": round(out.ttft_ms, 2),
            "prefill_tokens_per_s": round(out.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(out.decode_tokens_per_s, 2),
        }
        if drafter is not None:
            stats = drafter.stats
            result |= {"draft_tokens": stats.proposed, "accepted_tokens": stats.accepted,
                       "acceptance_rate": round(stats.acceptance_rate, 4)}
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
        _note_cut_json(args, out.finish_reason)
    return 0


def _note_cut_json(args: argparse.Namespace, finish_reason: str) -> None:
    """Say on stderr when --max-tokens cut output held to --json-schema short: what stdout holds is then not the
    whole JSON, and nothing else would tell a script that pipes it on (--json has finish_reason for that)."""
    if args.json_schema is not None and finish_reason == "length":
        print("kiln: note: the output reached --max-tokens before its JSON was complete, so it does not match the "
              "schema; raise --max-tokens", file=sys.stderr)


def _check_room(num_prompt: int, max_tokens: int | None, context: int) -> None:
    """A --max-tokens that the prompt leaves no room for in the context is refused, as the server refuses such a
    max_tokens: the answer would end early ("length") without a word. Without the flag, the default is cut at the
    end of the context. A prompt that fills the context alone is the engine's to refuse."""
    if max_tokens is not None and num_prompt < context < num_prompt + max_tokens:
        raise ContextLengthError(f"the prompt has {num_prompt} tokens and --max-tokens is {max_tokens}, "
                                 f"{num_prompt + max_tokens} in all, more than the model's context of {context} "
                                 f"tokens; shorten the prompt or pass --max-tokens {context - num_prompt} or less")


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Flags that do nothing together, refused before the load (each was ignored without a word)."""
    if args.raw and args.system is not None:
        raise InvalidParameterError("--system goes into the chat template, which --raw skips; drop --raw or --system")
    if args.speculate is not None and args.draft is None:
        raise InvalidParameterError(f"--speculate {args.speculate} only applies with --draft MODEL; add --draft or "
                                    "drop --speculate")
    if args.speculate is not None and args.speculate < 1:  # checked again by the drafter, once both models loaded
        raise InvalidParameterError(f"--speculate {args.speculate} must be at least 1")


def _check_speculative(args: argparse.Namespace, params: Any) -> None:
    # the engine drafts only greedy rows with nothing that changes the logits (it would decode plainly)
    if not params.is_greedy or args.repetition_penalty != 1.0 or args.presence_penalty or args.frequency_penalty \
            or args.kv_cache != "model" or params.grammar is not None:
        raise InvalidParameterError("--draft decodes greedily without penalties, --json-schema or --kv-cache int8; "
                                    "pass --temperature 0 and drop the others")


def _load_drafter(args: argparse.Namespace, loaded: Any, model: Any) -> Any:
    """`kiln generate --draft M`: the draft on the runtime --runtime picks for it, beside the model."""
    from kiln.engine.drafting import load_drafter
    from kiln.engine.threads import use_threads_for

    speculate = DEFAULT_SPECULATE if args.speculate is None else args.speculate
    drafter = load_drafter(args.draft, speculate, loaded.spec.vocab_size, args.runtime, args.dtype)
    use_threads_for(model)  # building the draft set this thread's torch count for the draft; the model steps here
    return drafter


def cmd_chat(args: argparse.Namespace) -> int:
    from kiln.chat import ChatSession, run_repl
    from kiln.model.load import load

    params = _params(args)
    loaded = load(args.model, precision=args.dtype)
    if not loaded.tokenizer.has_chat_template:
        # Checked before the prompt opens: the first message would fail the same way.
        raise ModelFormatError(
            f"{args.model} has no chat template, so `kiln chat` cannot lay out a conversation; "
            "use `kiln generate -m MODEL TEXT` (plain text) instead")
    return run_repl(ChatSession(loaded, params, system=args.system, model=_runtime_model(loaded, args.runtime)))


def cmd_eval(args: argparse.Namespace) -> int:
    from kiln import runs
    from kiln.benchmark.machine import machine_info
    from kiln.evaluate import summary
    from kiln.evaluate.runner import EvalOptions, EvalOutcome, check_api, check_baseline, run
    from kiln.evaluate.tasks import resolve
    from kiln.model.load import LoadedModel, load

    options = EvalOptions(
        task=args.task, limit=args.limit, ctx=args.ctx, limit_tokens=args.limit_tokens, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, data_dir=args.data, resume=args.resume, runtime=args.runtime,
    )
    if args.api:
        check_api(options, args.baseline is not None)
    else:  # they were ignored without a word
        given = [flag for flag, value in (("--api-key", args.api_key), ("--api-model", args.api_model),
                                          ("--api-timeout", args.api_timeout)) if value is not None]
        if given:
            raise InvalidParameterError(f"{', '.join(given)} only applies with --api URL; add --api or drop it")
    if args.baseline:  # refused after both models had loaded
        check_baseline(args.task)
    if args.samples:
        # written at the end: a bad path must not cost the evaluation
        summary.check_samples_path(args.samples, resolve(args.task).path)
    runs.check()  # the result is stored at the end: a damaged database must not cost the evaluation
    subject = _served(args) if args.api else load(args.model, precision=args.dtype)
    baseline = load(args.baseline, precision=args.dtype) if args.baseline else None

    def record(outcome: EvalOutcome) -> None:
        # through --api the settings carry the server's URL and model name instead of kiln's precision
        precision = {"precision": args.dtype} if isinstance(subject, LoadedModel) else {}
        settings = {**outcome.settings, **precision,
                    **({"baseline": args.baseline, "baseline_sha256": baseline.sha256} if baseline else {})}
        runs.add(runs.Run(
            kind="eval", model=args.model, model_sha256=subject.sha256, model_size_bytes=subject.source.size_bytes,
            task=outcome.task, settings=settings, metrics=outcome.metrics, versions=machine_info("transformers"),
            duration_s=outcome.seconds, worst=outcome.worst(), run_key=outcome.run_key,
        ))

    try:
        outcome = run(subject, options, baseline, keep_weights=False, record=record)  # the model is not used after
    finally:
        if not isinstance(subject, LoadedModel):
            subject.close()
    if args.samples:
        summary.write_samples(outcome, args.samples)
    if args.json:
        print(summary.as_json(outcome, args.model, subject.sha256))
    else:
        print(summary.text(outcome))
        print(summary.worst_text(outcome))
    return 0


def _served(args: argparse.Namespace):  # noqa: ANN202 (the import stays lazy)
    """kiln eval --api: the server asked which model it serves, and -m's tokenizer loaded without its weights."""
    from kiln import settings
    from kiln.evaluate.client import ApiConfig
    from kiln.evaluate.served import connect

    timeout = {} if args.api_timeout is None else {"timeout_s": args.api_timeout}  # else ApiConfig's default
    return connect(args.model, ApiConfig(args.api, api_key=args.api_key or settings.api_key(), model=args.api_model,
                                         **timeout))


def cmd_runs(args: argparse.Namespace) -> int:
    from kiln import jsonout, runs

    found = runs.query(model=args.model, kind=args.kind)
    if args.json:
        print(jsonout.dumps([r.__dict__ for r in found]))
        return 0
    if not found:
        # the filters are named: "no runs recorded" for --kind eval read as an empty database
        print(f"no {args.kind + ' ' if args.kind else ''}runs recorded in {runs.db_path()}"
              + (f" for {args.model!r}" if args.model else ""))
        return 0
    for r in found:
        keys = [k for k in ("ppl", "kld", "acc", "acc_norm", "exact_match", "f1", "bleu", "rouge_l") if k in r.metrics]
        shown = ", ".join(f"{k} {r.metrics[k]:.4g}" for k in keys)
        if r.kind == "bench":
            shown = ", ".join(f"b{x['batch_size']} {x['decode_tokens_per_s']:.1f} tok/s" for x in r.metrics["results"])
        if r.settings.get("api"):  # scored through a server: kept apart from kiln's in-process figures
            shown += f"  (via {r.settings['api']})"
        print(f"{r.id:>4}  {r.created_at}  {r.kind:<5} {r.task:<14} {r.model[:40]:<40} {r.model_sha256[:12]}  {shown}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kiln import runs
    from kiln.benchmark import latency
    from kiln.model.load import load

    options = latency.BenchOptions(
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs, data_dir=args.data,
        batch_sizes=tuple(_int_list(args.batch_sizes, "--batch-sizes")), kv_cache=args.kv_cache,
        runtime=args.runtime,
    )
    runs.check()  # the result is stored at the end: a damaged database must not cost the benchmark
    loaded = load(args.model, precision=args.dtype)
    report = latency.run(loaded, options)
    runs.add(runs.Run(
        kind="bench", model=args.model, model_sha256=loaded.sha256, model_size_bytes=loaded.source.size_bytes,
        task="bench",
        settings={k: report[k] for k in ("precision", "runtime", "prompt_tokens", "new_tokens", "runs", "kv_cache")},
        metrics={k: report[k] for k in ("load_seconds", "bytes_on_disk", "bytes_in_memory", "results")},
        versions=report["machine"], duration_s=0.0,
    ))
    print(json.dumps(report) if args.json else latency.format_table(report))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidParameterError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,4,16") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from kiln.model.info import artifact_layout, spec_of
    from kiln.plan import estimate, profile
    from kiln.plan.memory import PlanPrecision

    # a zero or negative count gave negative memory and speeds with exit 0, a NaN rate "to reach nan tok/s: does
    # not meet it" everywhere; refuse them before any work
    for flag, value in (("--context", args.context), ("--concurrency", args.concurrency),
                        ("--target-tokens-per-s", args.target_tokens_per_s)):
        if value is not None and not value > 0:
            raise InvalidParameterError(f"{flag} {value:g} is not a positive number; pass one above 0")
    spec = spec_of(args.model)  # a bad model fails before a calibration of minutes
    if args.context is not None and args.context > spec.max_position:
        raise InvalidParameterError(f"--context {args.context} is more than the model's context of "
                                    f"{spec.max_position} tokens; pass {spec.max_position} or less")
    context = args.context or spec.max_position
    # an artifact is priced by its own tensors (an int8 one was planned as fp32, 4x its weights and fp32 kernels'
    # speeds, then as int8 throughout, missing the fp32 head that compress keeps by default); --precision asks
    # what the model would cost at that precision throughout
    layout = None if args.precision else artifact_layout(args.model)
    precision: PlanPrecision = args.precision or (layout.layers if layout else "fp32")
    if args.calibrate:
        machine = profile.calibrate()
        print(f"kiln: calibrated this machine; profile cached in {profile.profile_path()}", file=sys.stderr)
    else:
        machine = profile.load_cached() or _calibrate_first(profile)
    plan = estimate.estimate(spec, precision, context, args.concurrency, machine, args.runtime, layout)
    advice = (estimate.recommend(spec, context, args.concurrency, args.target_tokens_per_s, machine)
              if args.target_tokens_per_s else [])
    if args.json:
        print(json.dumps({**plan.to_dict(), "recommendation": advice}))
        return 0
    gb = 1e9
    print(f"plan for {args.model} ({spec.architecture}, {spec.num_parameters / 1e6:.1f}M parameters), "
          f"{precision} on {plan.runtime}, context {context}, {args.concurrency} concurrent\n")
    for label, value in (("weights", plan.weights_bytes), ("KV cache", plan.kv_cache_bytes),
                         ("activations", plan.activations_bytes), ("runtime", plan.runtime_bytes),
                         ("total", plan.total_bytes)):
        print(f"  {label:<12} {value / gb:8.3f} GB")
    print(f"\n  prefill      ~{plan.prefill_tokens_per_s:,.0f} tok/s")
    print(f"  decode       ~{plan.decode_tokens_per_s:,.1f} tok/s per sequence, "
          f"~{plan.total_decode_tokens_per_s:,.1f} tok/s in total\n\nhow:")
    for line in plan.explanation:
        print(f"  - {line}")
    if advice:
        print(f"\nto reach {args.target_tokens_per_s:g} tok/s in total at {args.concurrency} concurrent:")
        for line in advice:
            print(f"  - {line}")
    return 0


def _calibrate_first(profile):  # noqa: ANN001, ANN202 (module passed to keep the import lazy)
    print("kiln: no usable machine profile for this CPU, thread count and kiln version yet; measuring this machine "
          "once (about four minutes)...", file=sys.stderr)
    return profile.calibrate()


def cmd_report(args: argparse.Namespace) -> int:
    from kiln.report import html
    from kiln.report.collect import collect
    from kiln.report.select import Budget, choose

    budget = Budget(args.max_ppl_increase, args.max_memory_mb, args.min_tokens_per_s, args.max_ttft_ms)
    models = args.model or None
    found = collect(models)  # read once: the page and the choice describe the same runs
    choice = choose(models, args.reference, budget, found)
    path = html.write(args.output, models, args.reference, choice, found).resolve()
    said = sys.stderr if is_stream(args.output) else sys.stdout  # -o /dev/stdout: the page alone on stdout
    if args.json:
        print(json.dumps({"report": str(path), **choice.as_dict()}), file=said)
    else:
        print(f"kiln: report written to {path}", file=said)
        if choice.chosen:
            print(f"kiln: best model: {choice.chosen} ({choice.reason})\n"
                  f"kiln: serve it with: kiln serve -m {choice.chosen}", file=said)
        elif budget.limits_resources:
            print(f"kiln: {choice.reason}; " + "; ".join(f"{k}: {v}" for k, v in choice.rejected.items()),
                  file=sys.stderr)
    # a budget the caller set and no model meets is a failed check (scripts gate a deployment on it)
    return 1 if budget.limits_resources and not choice.chosen else 0


def _recipe_from_flags(args: argparse.Namespace):  # noqa: ANN202 (keeps the import lazy)
    from kiln.compress.recipe import Calibration, LowRank, Prune, Quantize, Recipe, RecipeError

    steps: list = []
    if args.prune is not None:
        if args.prune_method == "2:4" and args.prune != 0.5:  # it pruned half, whatever --prune said
            raise RecipeError(f"--prune {args.prune} does not apply with --prune-method 2:4, which removes 2 of "
                              "every 4 weights; pass --prune 0.5")
        steps.append(Prune(sparsity=args.prune, **({"method": args.prune_method} if args.prune_method else {})))
    if args.lowrank_rank is not None or args.lowrank_energy is not None:
        steps.append(LowRank(rank=args.lowrank_rank, energy=args.lowrank_energy))
    if args.quantize is not None:
        bits = {"int8": 8, "int4": 4, "w8a8": 8}[args.quantize]
        method = "smoothquant" if args.quantize == "w8a8" else args.method or "rtn"
        # the step options left out take the step's defaults (_check_step_options refused those it does not read)
        given = {name: value for name, value in (("group_size", args.group_size), ("alpha", args.alpha),
                                                  ("target", args.gptq_target), ("refit", args.gptq_refit),
                                                  ("zero_point", args.zero_point))
                 if value is not None}
        steps.append(Quantize(bits=bits, method=method, symmetric=bool(args.symmetric),
                              keep_embeddings=args.quantize_embeddings is None,
                              head_bits=8 if args.quantize_embeddings == "int8" else 0, **given))
    if not steps:
        raise RecipeError("nothing to do: pass --recipe FILE, --sweep FILE, or --quantize / --prune / --lowrank-*")
    if args.calibration_samples is not None:
        from kiln.compress.pipeline import reads_calibration

        if not any(reads_calibration(step) for step in steps):  # RTN or magnitude pruning: taken, recorded, unused
            raise RecipeError("--calibration-samples applies with a step that reads calibration text (--method gptq "
                              "or awq, --quantize w8a8, --prune-method other than magnitude); drop it")
        return Recipe(tuple(steps), Calibration(samples=args.calibration_samples))
    return Recipe(tuple(steps))


def _check_one_recipe_source(args: argparse.Namespace) -> None:
    """A --recipe or --sweep file holds the steps and calibration; flags beside it were silently ignored."""
    from kiln.compress.recipe import RecipeError

    source = "--recipe" if args.recipe else "--sweep" if args.sweep else None
    if source is None:
        return
    if args.recipe and args.sweep:
        raise RecipeError("--sweep does not apply with --recipe; pass one of them")
    flags = {"--quantize": args.quantize, "--prune": args.prune, "--lowrank-rank": args.lowrank_rank,
             "--lowrank-energy": args.lowrank_energy, "--calibration-samples": args.calibration_samples,
             **{flag: value for flag, value, _, _ in _step_options(args)}}
    for flag, value in flags.items():
        if value is not None:
            raise RecipeError(f"{flag} does not apply with {source}: the file holds the steps and calibration; "
                              f"put it in the file or drop {source}")


def _step_options(args: argparse.Namespace) -> list[tuple[str, Any, bool, str]]:
    """(flag, value or None when not given, whether the steps the flags make read it, the flag that makes one)."""
    quantize = args.quantize in ("int8", "int4")  # w8a8 is SmoothQuant: no --method, grid or GPTQ settings
    return [
        ("--method", args.method, quantize, "--quantize int8 or int4 (w8a8 is SmoothQuant)"),
        ("--group-size", args.group_size, args.quantize == "int4", "--quantize int4"),
        ("--symmetric", args.symmetric, args.quantize == "int4", "--quantize int4"),
        # a symmetric grid's zero point is always 8: --zero-point beside --symmetric would be dropped
        ("--zero-point", args.zero_point, args.quantize == "int4" and not args.symmetric,
         "--quantize int4, asymmetric (no --symmetric)"),
        ("--alpha", args.alpha, args.quantize == "w8a8", "--quantize w8a8"),
        ("--target", args.gptq_target, quantize and args.method in ("gptq", "awq"), "--method gptq or awq"),
        ("--gptq-refit", args.gptq_refit, quantize and args.method == "gptq", "--method gptq"),
        ("--quantize-embeddings", args.quantize_embeddings, args.quantize is not None, "--quantize"),
        ("--prune-method", args.prune_method, args.prune is not None, "--prune"),
    ]


def _check_step_options(args: argparse.Namespace) -> None:
    """An option no step reads was ignored without a word: --method gptq with --quantize w8a8 made a
    SmoothQuant artifact, --group-size 32 with int8 a per-channel one, --prune-method without --prune nothing."""
    from kiln.compress.recipe import RecipeError

    for flag, value, is_read, needs in _step_options(args):
        if value is not None and not is_read:
            raise RecipeError(f"{flag} applies with {needs}; add that or drop {flag}")


def cmd_compress(args: argparse.Namespace) -> int:
    from kiln.artifact.io import check_output
    from kiln.compress.pipeline import check_calibration, check_not_source, compress
    from kiln.compress.recipe import Recipe, read_sweep

    _check_one_recipe_source(args)
    _check_step_options(args)
    if args.sweep:
        outputs = [(args.output / name, recipe) for name, recipe in read_sweep(args.sweep)]
    else:
        recipe = Recipe.from_toml(args.recipe) if args.recipe else _recipe_from_flags(args)
        outputs = [(args.output, recipe)]
    for out, recipe in outputs:  # a file or a folder of other things would be lost (or refused) only after the work
        check_output(out)
        check_not_source(args.model, out)
        try:  # a missing calibration file or the test split in entry 3 was found after entries 1 and 2 were made
            check_calibration(recipe, args.data)
        except KilnError as exc:
            if args.sweep:
                exc.args = (f"sweep entry {out.name!r}: {exc}; no artifact written",)
            raise
    written: list[Path] = []
    for out, recipe in outputs:  # every recipe is validated above, before any work
        try:
            manifest = compress(args.model, recipe, out, data_dir=args.data)
        except (KilnError, KeyboardInterrupt) as exc:
            if not args.sweep:
                raise
            raise _sweep_failure(exc, out, written) from None
        written.append(out)
        size = (out / "model.safetensors").stat().st_size
        print(f"kiln: wrote {out} ({size / 1e6:.1f} MB, {manifest.history.get('seconds', 0):.0f} s)")
    return 0


def _sweep_failure(exc: KilnError | KeyboardInterrupt, out: Path, written: list[Path]) -> KilnError:
    """The error of one sweep entry, naming it and the artifacts already written (kept): the bare error
    named neither, so a long sweep left the user to guess which entry failed and what survived."""
    kept = (f"{', '.join(p.name for p in written)} already written in {out.parent} and kept" if written
            else "no artifact written before it")
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted in sweep entry {out.name!r}; {kept}")
    # the same error, so the same exit status; only the line grows
    exc.args = (f"sweep entry {out.name!r}: {exc}; {kept}",)
    return exc


def cmd_distill(args: argparse.Namespace) -> int:

    from kiln.artifact.io import check_output
    from kiln.compress.pipeline import distill_to_artifact
    from kiln.compress.recipe import Distill, RecipeError

    check_output(args.output)  # before the training, not after it
    layers = None
    if args.student_config:
        if args.student_layers is not None:  # the file's layers were trained, the flag's count went in the manifest
            raise RecipeError("--student-layers and --student-config both choose the student's layers; pass one")
        layers = _student_config(args.student_config)
    count = len(layers) if isinstance(layers, list) and layers else None  # distil() checks the list itself
    # `is None`, not `or`: --student-layers 0 fell back to the default half of the teacher and trained it
    wanted = count if args.student_layers is None else args.student_layers
    cfg = Distill(student_layers=wanted, steps=args.steps,
                  time_budget_s=args.time_budget, lr=args.lr, temperature=args.temperature, ce_weight=args.ce_weight,
                  batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision)
    manifest = distill_to_artifact(args.teacher, cfg, args.output, layers, args.data, args.resume,
                                   args.checkpoint_every)
    info = manifest.history["distillation"]
    print(f"kiln: wrote {args.output} ({len(info['teacher_layers'])} layers, {info['steps']} steps, "
          f"{info['tokens']:,} tokens, {info['seconds']:.0f} s)")
    return 0


def _student_config(path: Path) -> Any:
    """The layer list of a --student-config file (distil() checks its values). Any other key is refused: a student
    is the teacher's own layers, so a width or vocabulary there was ignored without a word."""
    from kiln.compress.recipe import RecipeError

    expected = '{"layers": [teacher layer indices]}'
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path}: expected {expected} ({exc})") from exc
    if not isinstance(data, dict) or "layers" not in data:
        raise RecipeError(f"{path}: expected {expected}")
    others = sorted(set(data) - {"layers"})
    if others:
        raise RecipeError(f"{path}: unknown key {others[0]!r}; a student keeps the teacher's width and vocabulary "
                          f"and only chooses its layers: {expected}")
    return data["layers"]


def cmd_export(args: argparse.Namespace) -> int:
    from kiln.artifact import gguf_export, onnx_export
    from kiln.model.load import load
    from kiln.model.source import resolve

    # before loading and building, not after
    if args.format == "onnx":
        onnx_export.check_output(args.output)
    else:
        if args.precision != "auto":  # it was ignored without a word: an fp32 model came out as F32
            raise InvalidParameterError(f"--precision {args.precision} applies to --format onnx; a GGUF export "
                                        "keeps the model's own precision: compress it first (kiln compress "
                                        "--quantize) or drop --precision")
        gguf_export.check_output(args.output, resolve(args.model).path)
    loaded = load(args.model, precision="fp32")
    if args.format == "onnx":
        path = onnx_export.export(loaded, args.output, args.precision)
        size = sum(f.stat().st_size for f in path.iterdir())
        # the folder is ORT GenAI's format (genai_config.json); kiln's onnxruntime runtime builds and caches its own
        print(f"kiln: wrote {path} ({size / 1e6:.1f} MB); ONNX Runtime GenAI runs it as it is "
              f"(onnxruntime_genai.Model('{path}')); kiln runs the same graph with -m {args.model} "
              "--runtime onnxruntime")
        return 0
    path = gguf_export.export(loaded, args.output)
    print(f"kiln: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from kiln.serve.feedback import FeedbackStore

    count = FeedbackStore().export(args.output, only_rated=args.rated_only)
    # on stderr when the records went to stdout (-o /dev/stdout), where the line would have ended the JSONL
    print(f"kiln: wrote {count} records to {args.output}", file=sys.stderr if is_stream(args.output) else sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.serve.app import serve
    from kiln.serve.state import ServeConfig

    config = ServeConfig(
        models=tuple(args.model or ["default"]), registry=args.registry, host=args.host, port=args.port,
        api_key_file=args.api_key_file, requests_per_min=args.rate_limit_requests,
        tokens_per_min=args.rate_limit_tokens, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout, log_requests=args.log_requests, guardrails=tuple(args.guardrails),
        precision=args.dtype, kv_budget_bytes=_kv_budget_bytes(args.kv_budget_mb), max_running=args.max_running,
        max_batch_tokens=args.max_batch_tokens, kv_cache=args.kv_cache, runtime=args.runtime, draft=args.draft,
        speculate=_serve_speculate(args),
    )
    if args.draft is not None and args.kv_cache == "int8":  # refused before the models load (the engine would)
        from kiln.engine.engine import DRAFT_WITH_INT8_KV

        raise InvalidParameterError(DRAFT_WITH_INT8_KV)
    if args.api_key_file is not None:  # refuse a bad key file before loading anything
        from kiln.serve.auth import load_digests

        load_digests(args.api_key_file)
    return serve(config)


def _serve_speculate(args: argparse.Namespace) -> int:
    """--speculate, refused without --draft as `kiln generate` refuses it: alone it was ignored without a word."""
    if args.speculate is not None and args.draft is None:
        raise InvalidParameterError(f"--speculate {args.speculate} only applies with --draft MODEL; add --draft or "
                                    "drop --speculate")
    return DEFAULT_SPECULATE if args.speculate is None else args.speculate


def _kv_budget_bytes(mib: float) -> int:
    """--kv-budget-mb in bytes. argparse's float() takes "nan" and "inf" (int() of them was a traceback) and a
    negative budget was refused naming kv_budget_bytes, which no flag is called."""
    if not (math.isfinite(mib) and mib > 0):
        raise InvalidParameterError(f"--kv-budget-mb {mib} must be a positive number of MiB, such as 1024")
    return int(mib * 2**20)


def cmd_registry(args: argparse.Namespace) -> int:
    from kiln.serve.registry import Registry

    registry = Registry()
    if args.action == "add":
        v = registry.add(args.name, args.path, args.version)
        print(f"kiln: {v.name} {v.version} added ({v.state}), sha256 {v.sha256[:16]}")
    elif args.action == "promote":
        v = registry.promote(args.name, args.version)
        print(f"kiln: {v.name} {v.version} is live")
    elif args.action == "rollback":
        v = registry.rollback(args.name)
        print(f"kiln: {v.name} {v.version} is live again")
    elif args.action == "canary":
        v = registry.canary(args.name, args.version, args.share)
        print(f"kiln: {v.name} {v.version} takes {v.canary_share:.0%} of the traffic")
    else:
        found = registry.versions(args.name)
        if not found and args.name is not None:  # a misspelt name listed nothing, exit 0, as if it had no versions
            known = ", ".join(sorted({v.name for v in registry.versions()})) or "none"
            raise InvalidParameterError(f"the registry has no model {args.name!r} (models: {known})")
        if not found:
            print(f"no models registered in {registry.path}; add one with `kiln registry add NAME MODEL`")
        for v in found:
            share = f" {v.canary_share:.0%}" if v.state == "canary" else ""
            print(f"{v.name:<20} {v.version:<14} {v.state + share:<12} {v.sha256[:16]}  {v.created_at}  {v.path}")
    return 0


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
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help=KV_CACHE_HELP)
    p.add_argument("--draft", default=None,
                   help="speculative decoding with this draft model (greedy; e.g. an int4 artifact of the model "
                        "or a `kiln distill` student), on the runtime --runtime picks for it")
    p.add_argument("--speculate", type=int, default=None,
                   help=f"--draft: tokens the draft proposes per step (default {DEFAULT_SPECULATE})")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[common, sampling], help="talk to a model interactively")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", parents=[common], help="perplexity, multiple-choice accuracy, generation metrics")
    p.add_argument("--task", required=True,
                   help="wikitext2, hellaswag, arc_easy, arc_challenge, piqa, lambada_openai, squad, mc:FILE.jsonl "
                        "or gen:FILE.jsonl")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items (multiple choice, lambada_openai, generation)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity: tokens per chunk (llama.cpp's -c)")
    p.add_argument("--limit-tokens", type=int, default=None, help="perplexity: only chunks in the first N tokens")
    p.add_argument("--baseline", default=None, help="perplexity: KL divergence and Δppl against this model")
    p.add_argument("--batch-size", type=int, default=None, help="chunks / choice rows / prompts per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation tasks: tokens per answer")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="generation tasks: the runtime that generates (torch, the default, is the reference; auto "
                        "picks as kiln serve does); scoring tasks use torch")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: KILN_DATA_DIR or ../shared/data)")
    p.add_argument("--samples", type=Path, default=None, help="write one JSON record per item to this file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same evaluation")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute precision")
    p.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    g = p.add_argument_group("scoring through a server")
    g.add_argument("--api", default=None, metavar="URL",
                   help="score through this OpenAI-compatible server (e.g. kiln serve at http://127.0.0.1:8000) "
                        "instead of in-process; -m names the model it serves, whose tokenizer makes the token ids. "
                        "Multiple choice and perplexity need prompt logprobs (echo): a server without them is "
                        "refused, not scored at chance")
    g.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key (default: $KILN_API_KEY)")
    g.add_argument("--api-model", default=None, metavar="NAME",
                   help="the served model's name (default: the only model the server lists)")
    g.add_argument("--api-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long one request may take before the run fails (default: 600; a request scores up to "
                        "16 prompts)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[common], help="latency, throughput and memory at several batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated, e.g. 1,4,16")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help=KV_CACHE_HELP)
    p.add_argument("--runs", type=int, default=5, help="repetitions per batch size (median and range are shown)")
    p.add_argument("--data", type=Path, default=None, help="data folder for the prompts")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute precision")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", parents=[common], help="memory and speed before deploying (config or header only)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8", "int4"], default=None,
                   help="weight format to plan (default: a kiln artifact's own, else fp32)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences served at once")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="whose speeds to plan: auto picks as generate, bench and serve do")
    p.add_argument("--target-tokens-per-s", type=float, default=None, help="total decode rate to reach")
    p.add_argument("--calibrate", action="store_true", help="measure this machine again")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="one HTML page comparing models: table, Pareto plots, worst items")
    p.add_argument("--model", action="append", default=[], help="include this model (repeatable; default: all)")
    p.add_argument("--reference", default=None, help="the model Δppl is measured against (default: the first)")
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    g = p.add_argument_group("which model to serve: the least perplexity within these limits (with none, the "
                             "smallest within the perplexity limit)")
    g.add_argument("--max-ppl-increase", type=float, default=2.0, metavar="PCT",
                   help="wikitext2 perplexity at most this many percent above the reference's (default 2)")
    g.add_argument("--max-memory-mb", type=float, default=None, metavar="MB", help="peak RSS in `kiln bench`")
    g.add_argument("--min-tokens-per-s", type=float, default=None, metavar="R",
                   help="batch-1 decode tokens/s in `kiln bench`")
    g.add_argument("--max-ttft-ms", type=float, default=None, metavar="MS",
                   help="batch-1 time to first token in `kiln bench`")
    p.add_argument("--json", action="store_true", help="print one JSON object: the report's path and the choice")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compress", parents=[common], help="quantize, prune, factorise, distil into an artifact")
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact folder (a folder of them with --sweep)")
    p.add_argument("--recipe", type=Path, default=None, help="a TOML recipe of [[step]] tables")
    p.add_argument("--sweep", type=Path, default=None, help="a TOML file of [[artifact]] recipes, each with a name")
    p.add_argument("--quantize", choices=["int8", "int4", "w8a8"], default=None)
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default=None, help="quantization method (default rtn)")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (32, 64, 128; default 128)")
    p.add_argument("--symmetric", action="store_true", default=None, help="int4: symmetric grid")
    p.add_argument("--zero-point", choices=["float", "integer"], default=None,
                   help="int4 asymmetric: each group's offset is its minimum (float, llama.cpp's Q4_1; the default) "
                        "or an integer zero point (integer, as GPTQ / AWQ checkpoints; ONNX Runtime runs it as fast "
                        "as symmetric)")
    p.add_argument("--quantize-embeddings", nargs="?", const="same", choices=["same", "int8"], default=None,
                   help="also quantize the embedding / lm_head: at the layers' bits, or int8 (int4 layers with an "
                        "int8 head, as llama.cpp keeps its output matrix at 6-8 bits)")
    p.add_argument("--alpha", type=float, default=None, help="w8a8: SmoothQuant migration strength (default 0.5)")
    p.add_argument("--target", "--gptq-target", dest="gptq_target", choices=["model", "layer"], default=None,
                   help="gptq, awq: aim at the uncompressed model's layer outputs (model, the default) or at each "
                        "layer's own (layer: the papers' algorithms)")
    p.add_argument("--gptq-refit", type=int, default=None,
                   help="gptq int4: rounds of refitting the group grids (default 2)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration sequences of 512 tokens (default 128)")
    p.add_argument("--prune", type=float, default=None, help="sparsity to reach, e.g. 0.5")
    p.add_argument("--prune-method", choices=["magnitude", "wanda", "2:4", "heads", "channels", "layers"],
                   default=None, help="default magnitude")
    p.add_argument("--lowrank-rank", type=int, default=None)
    p.add_argument("--lowrank-energy", type=float, default=None)
    p.add_argument("--data", type=Path, default=None, help="data folder for calibration text")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("distill", help="train a smaller student on a teacher's logits")
    p.add_argument("--teacher", default="default")
    p.add_argument("--student-layers", type=int, default=None, help="keep this many teacher layers, evenly spaced")
    p.add_argument("--student-config", type=Path, default=None, help='JSON {"layers": [teacher layer indices]}')
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="matmul precision while training (weights stay fp32)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --output")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", parents=[common], help="write a model or artifact as GGUF or ONNX")
    p.add_argument("--format", choices=["gguf", "onnx"], default="gguf")
    p.add_argument("--precision", choices=["auto", "fp32", "int8", "int4"], default="auto",
                   help="onnx: weight precision (auto: as the artifact was quantized)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("feedback", help="served requests and their ratings, for the next distillation round")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("export", help="write logged requests (PII redacted) as JSONL")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .jsonl file to write")
    p.add_argument("--rated-only", action="store_true", help="only responses that received a rating")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the continuous-batching engine")
    p.add_argument("-m", "--model", action="append", default=[], help="model to serve (repeatable); default: default")
    p.add_argument("--registry", action="store_true", help="serve the registry's live versions, following changes")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help=KV_CACHE_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", type=Path, default=None, help="sha256 hex digests of accepted keys, one a line")
    p.add_argument("--rate-limit-requests", type=float, default=None, help="requests per minute per key")
    p.add_argument("--rate-limit-tokens", type=float, default=None, help="tokens per minute per key")
    p.add_argument("--max-queue", type=int, default=256, help="requests queued or running at once; more get 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; 0 = none")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on SIGTERM; those still running then end with "
                        "finish_reason abort")
    p.add_argument("--log-requests", action="store_true", help="keep requests and responses (redacted) for feedback")
    p.add_argument("--guardrails", action="append", default=[], help="filters: FILE, or NAME=FILE for one model")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--kv-budget-mb", type=float, default=1024, help="KV cache per model version, MiB")
    p.add_argument("--max-running", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="prompt tokens prefilled per step")
    p.add_argument("--draft", default=None,
                   help="speculative decoding while one greedy request decodes alone: a draft model with the same "
                        "tokenizer (an int4 artifact, a kiln distill student)")
    p.add_argument("--speculate", type=int, default=None,
                   help=f"--draft: tokens the draft proposes per step (default {DEFAULT_SPECULATE})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("registry", help="named model versions: add, list, promote, rollback, canary")
    reg = p.add_subparsers(dest="action", required=True)
    q = reg.add_parser("add", help="register a model version")
    q.add_argument("name")
    q.add_argument("path", help="artifact folder, .gguf, Hugging Face folder or 'default'")
    q.add_argument("--version", default=None, help="version label (default: the first 12 hex of its sha256)")
    q = reg.add_parser("list", help="list versions")
    q.add_argument("name", nargs="?", default=None)
    q = reg.add_parser("promote", help="make a version live")
    q.add_argument("name")
    q.add_argument("version")
    q = reg.add_parser("rollback", help="make the previous live version live again")
    q.add_argument("name")
    q = reg.add_parser("canary", help="send a share of traffic to a version")
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("--share", type=float, required=True, help="fraction in [0, 1]; 0 ends the canary")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("runs", help="list recorded eval and bench results")
    p.add_argument("--model", default=None, help="only runs of this model (name or sha256 prefix)")
    p.add_argument("--kind", choices=["eval", "bench"], default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_runs)
    return parser


def _end_on_next_ctrl_c() -> None:
    """After Ctrl-C the command is over: a second one ends the process at once (exit status 130 in the
    shell) instead of raising KeyboardInterrupt into the exit handlers, which printed their tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # here, where a full disk is caught, not at exit
        return code
    except KilnError as exc:
        is_interruption = exc.exit_code == 130  # one the command turned into its own message (eval, distill)
        if is_interruption:
            _end_on_next_ctrl_c()
        if args.debug:
            traceback.print_exc()
        # an interruption is not a mistake: its line reads "kiln: interrupted ...", as any other Ctrl-C's does
        print(f"kiln: {exc}" if is_interruption else f"kiln: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _end_on_next_ctrl_c()
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        if exc.errno not in DISK_FULL:  # anything else is kiln's bug: its traceback is wanted
            raise
        _drop_pending_output()
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"kiln: error: the disk is full{where}: {exc.strerror}; free some space and run the command again",
              file=sys.stderr)
        return 2


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the user's to fix, wherever kiln was writing: stdout, a file, a cache


def _drop_pending_output() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail again with a traceback."""
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a caller's own stream): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
