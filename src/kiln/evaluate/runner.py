"""Run one evaluation task on a loaded model, or one behind a server: items in batches, a progress bar,
resumable on Ctrl-C.

Scoring lives in perplexity.py, multiple_choice.py and generation.py, their numbers in scorer.py (in-process)
or served.py (--api); this module feeds them, keeps the checkpoint of finished items, and turns per-item
records into the task's metrics.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from kiln import settings
from kiln.compress.quantize.qlinear import widened
from kiln.engine import RUNTIMES
from kiln.engine.generate import Generator
from kiln.errors import ContextLengthError, DataFormatError, Interrupted, InvalidParameterError
from kiln.evaluate import completion, generation, loglikelihood, multiple_choice, perplexity
from kiln.evaluate.checkpoint import Checkpoint
from kiln.evaluate.data import data_file, read_text
from kiln.evaluate.generation import EngineGenerator, TextGenerator
from kiln.evaluate.scorer import ModelScorer, Scorer
from kiln.evaluate.served import ApiGenerator, ApiScorer, ServedModel
from kiln.evaluate.tasks import TaskKind, TaskRef, resolve
from kiln.evaluate.tasks import completion as completion_tasks
from kiln.evaluate.tasks import generation as gen_tasks
from kiln.evaluate.tasks import multiple_choice as mc_tasks
from kiln.model.load import LoadedModel
from kiln.model.source import sha256_file

WORST_ITEMS = 10
T = TypeVar("T")
Records = list[dict[str, Any]]
Metrics = dict[str, float | None]  # a standard error is None where it is undefined (one item)
TaskResult = tuple[Records, Metrics]


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how much of it."""

    task: str  # a built-in task name, mc:FILE.jsonl or gen:FILE.jsonl
    limit: int | None = None  # first N items (multiple choice, generation)
    ctx: int = 512  # perplexity: tokens per chunk
    limit_tokens: int | None = None  # perplexity: only the chunks within the first N tokens
    batch_size: int | None = None  # chunks (perplexity), choice rows (multiple choice), prompts (generation)
    max_new_tokens: int = 32  # generation
    data_dir: Path | None = None  # default: KILN_DATA_DIR or ../shared/data
    resume: bool = False  # continue an interrupted run with the same model, task and settings
    # generation tasks: the runtime that generates (kiln generate's choices). Scoring tasks read
    # log-likelihoods from kiln's torch graph, the reference the harness comparisons rest on.
    runtime: str = "torch"

    def __post_init__(self) -> None:
        ref = resolve(self.task)  # unknown tasks fail before any model is loaded
        for name in ("limit", "limit_tokens", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidParameterError(f"--{name.replace('_', '-')} {value} must be at least 1")
        if self.ctx < 16 or self.ctx % 2:
            raise InvalidParameterError(f"--ctx {self.ctx} must be an even number of tokens, at least 16")
        # each limit counts what its kind of task has; the other one was ignored without a word
        if ref.kind == "perplexity" and self.limit is not None:
            raise InvalidParameterError(f"--limit counts items, and {ref.name} is one text cut into chunks; pass "
                                        f"--limit-tokens N (a multiple of --ctx {self.ctx}) instead")
        if ref.kind != "perplexity" and self.limit_tokens is not None:
            raise InvalidParameterError(f"--limit-tokens applies to perplexity (wikitext2); {ref.name} takes "
                                        "--limit N items instead")
        if self.limit_tokens is not None and self.limit_tokens < self.ctx:  # one whole chunk was scored
            raise InvalidParameterError(f"--limit-tokens {self.limit_tokens} is less than one chunk of --ctx "
                                        f"{self.ctx} tokens; pass at least {self.ctx}")
        if self.runtime not in RUNTIMES:
            raise InvalidParameterError(f"--runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.runtime != "torch" and ref.kind != "generation":
            raise InvalidParameterError(
                f"--runtime {self.runtime} applies to generation tasks (squad, gen:FILE.jsonl); {ref.name} is "
                "scored on kiln's torch graph: drop --runtime"
            )

    def settings(self) -> dict[str, Any]:
        keep = {"task", "limit", "ctx", "limit_tokens", "max_new_tokens"}
        if resolve(self.task).kind == "generation":
            keep.add("runtime")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k in keep}


@dataclass
class EvalOutcome:
    task: str
    kind: TaskKind
    metrics: Metrics
    records: list[dict[str, Any]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    run_key: str | None = None  # set when run() stores the outcome: the same for a run and its resumptions

    def worst(self, n: int = WORST_ITEMS) -> list[dict[str, Any]]:
        return sorted(self.records, key=lambda r: r["score"])[:n]


class EvalInterrupted(Interrupted):
    pass


def check_baseline(task: str) -> None:
    """Refuse --baseline for a task it does not apply to (kiln eval calls it before loading either model)."""
    ref = resolve(task)
    if ref.kind != "perplexity":
        raise InvalidParameterError(f"--baseline applies to perplexity tasks, not {ref.name!r}")


def check_api(options: EvalOptions, has_baseline: bool) -> None:
    """Refuse, before anything loads, what scoring through a server cannot do."""
    if has_baseline:
        raise InvalidParameterError("--baseline compares full next-token distributions, which a server does not "
                                    "return; drop --baseline or --api")
    if options.runtime != "torch":
        raise InvalidParameterError(f"--runtime {options.runtime} picks kiln's own runtime; with --api the server "
                                    "runs the model: drop --runtime")


def run(loaded: LoadedModel | ServedModel, options: EvalOptions, baseline: LoadedModel | None = None,
        progress: bool = True, keep_weights: bool = True,
        record: Callable[[EvalOutcome], None] | None = None) -> EvalOutcome:
    """Evaluate `loaded` on options.task (in-process, or through its server for a ServedModel); finished items
    survive Ctrl-C for --resume.

    record: stores the outcome (kiln eval: in the runs database, under outcome.run_key) before the
    checkpoint goes, so a Ctrl-C or crash between the two leaves the run to --resume, not lost.

    keep_weights=False: a generation task that runs on an ONNX Runtime session lets kiln's copy of the
    weights go before the session loads its own (engine/onnx_runtime.pick_runtime), for a caller that
    is done with `loaded` afterwards, as `kiln eval` is."""
    ref = resolve(options.task)
    if isinstance(loaded, ServedModel):
        check_api(options, baseline is not None)
    if baseline is not None:
        check_baseline(options.task)
    if baseline is not None and baseline.spec.vocab_size != loaded.spec.vocab_size:
        raise InvalidParameterError(
            f"--baseline has a vocabulary of {baseline.spec.vocab_size} tokens, the model {loaded.spec.vocab_size}; "
            "KL divergence needs the same tokenizer"
        )
    runtime_model: object = None if isinstance(loaded, ServedModel) else loaded.model
    if ref.kind == "generation" and isinstance(loaded, LoadedModel):
        from kiln.engine.onnx_runtime import pick_runtime

        # resolved before the checkpoint, so --resume continues on the runtime that started the run
        runtime_model, picked = pick_runtime(loaded, options.runtime, keep_weights=keep_weights)
        options = replace(options, runtime=picked)
    # where the numbers come from: a server's URL (kept with the result), or the precision of kiln's graph
    source = loaded.settings() if isinstance(loaded, ServedModel) else {"precision": str(loaded.model.dtype)}
    # a user's file is named by its content too: resumed after an edit, the items done before were mixed
    # with the edited file's (or another file's, as a relative path from another folder)
    data = {"data_sha256": sha256_file(ref.path)} if ref.path is not None and ref.path.is_file() else {}
    checkpoint = Checkpoint({"model": loaded.sha256, "baseline": baseline.sha256 if baseline else None,
                             **source, **options.settings(), **data})
    if options.resume and not checkpoint.path.is_file():
        # it used to start afresh without a word, as if there had been nothing to resume
        what = "this model, these settings and this content of its file" if data else "this model and these settings"
        raise InvalidParameterError(
            f"--resume: there is no interrupted run of {ref.name} with {what} to continue "
            f"(no checkpoint {checkpoint.path}); drop --resume to start afresh")
    done = checkpoint.load() if options.resume else {}
    if not options.resume:
        checkpoint.start()
    start = time.perf_counter()
    # on kiln's graph, int8 / int4 layers keep their widened matrices for the run: the same numbers without
    # widening every matrix at every call (generation on an int4 artifact: 2.2-3.3x faster)
    with widened(loaded.model) if isinstance(loaded, LoadedModel) and runtime_model is loaded.model else nullcontext():
        if ref.kind == "generation":
            generator = (ApiGenerator(loaded) if isinstance(loaded, ServedModel)
                         else EngineGenerator(Generator(runtime_model, loaded.tokenizer)))  # type: ignore[arg-type]
            records, metrics = _run_generation(loaded, generator, options, ref, checkpoint, done, progress)
        else:
            runners = {"perplexity": _run_perplexity, "multiple_choice": _run_multiple_choice,
                       "completion": _run_completion}
            records, metrics = runners[ref.kind](loaded, _scorer(loaded, options, baseline), options, ref, baseline,
                                                 checkpoint, done, progress)
    settings = {**options.settings(), **(source if isinstance(loaded, ServedModel) else {})}
    outcome = EvalOutcome(ref.name, ref.kind, metrics, records, time.perf_counter() - start, settings)
    if record is not None:
        # Stored first, the checkpoint removed after. A crash between the two leaves a complete checkpoint
        # holding the key the result was stored under: --resume scores no item again, and the runs database
        # keeps one result per key, so the result is stored once whichever side of the write the crash fell.
        outcome.run_key = checkpoint.key()
        try:
            record(outcome)
        except KeyboardInterrupt:
            raise EvalInterrupted(
                "interrupted while storing the result; rerun the same command with --resume to store it"
            ) from None
    checkpoint.discard()
    return outcome


def _scorer(loaded: LoadedModel | ServedModel, options: EvalOptions, baseline: LoadedModel | None) -> Scorer:
    if isinstance(loaded, ServedModel):
        return ApiScorer(loaded)
    return ModelScorer(loaded.model, options.batch_size or loglikelihood.MAX_ROWS,
                       baseline.model if baseline is not None else None)


def _process(
    items: Sequence[T], done: dict[int, dict[str, Any]], index: Callable[[T], int], batch_size: int,
    work: Callable[[list[T]], list[dict[str, Any]]], checkpoint: Checkpoint, desc: str, unit: str, progress: bool,
) -> list[dict[str, Any]]:
    """Run `work` on the items not yet done, batch by batch, checkpointing each batch's records."""
    records = [done[index(it)] for it in items if index(it) in done]
    todo = [it for it in items if index(it) not in done]
    bar = tqdm(total=len(items), initial=len(records), desc=desc, unit=unit, disable=None if progress else True)
    try:
        for batch in _batched(todo, batch_size):
            new = work(batch)
            checkpoint.append(new)
            records += new
            bar.update(len(batch))
    except KeyboardInterrupt:
        raise EvalInterrupted(
            f"interrupted after {len(records)} of {len(items)} {unit}s; rerun the same command with --resume "
            "to continue"
        ) from None
    finally:
        bar.close()
    return sorted(records, key=lambda r: r["index"])


def _batched(items: Iterable[T], size: int) -> Iterable[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _run_perplexity(loaded: LoadedModel | ServedModel, scorer: Scorer, options: EvalOptions, ref: TaskRef,
                    baseline: LoadedModel | None, checkpoint: Checkpoint, done: dict[int, dict[str, Any]],
                    progress: bool) -> TaskResult:
    context = min(m.spec.max_position for m in (loaded, baseline) if m is not None)
    if options.ctx > context:  # past it the rotary table has no rows: an IndexError mid-run
        raise InvalidParameterError(f"--ctx {options.ctx} is more than the model's context of {context} tokens; "
                                    f"pass --ctx {context} or less")
    tok = loaded.tokenizer
    text = read_text(data_file("wikitext-2-raw/wiki.test.raw", options.data_dir))
    bos = tok.hf.bos_token_id if tok.adds_bos else None
    tokens = ([bos] if bos is not None else []) + tok.encode(text, add_special_tokens=False)
    chunks = perplexity.chunks(tokens, options.ctx, bos, options.limit_tokens)
    if not chunks:
        raise InvalidParameterError(f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {options.ctx}")

    def work(batch: list[int]) -> list[dict[str, Any]]:
        sums = scorer.chunks([chunks[i] for i in batch])
        return [{"index": i, "sums": s.to_dict(), "score": -s.nll / s.count} for i, s in zip(batch, sums, strict=True)]

    records = _process(list(range(len(chunks))), done, lambda i: i, options.batch_size or 4, work, checkpoint,
                       "wikitext2", "chunk", progress)
    total = perplexity.Sums()
    for r in records:
        total.add(perplexity.Sums.from_dict(r.pop("sums")))
        first = options.ctx // 2
        r["input"] = tok.decode(chunks[r["index"]][first : first + 48])
        r["target"] = ""
        r["nll"] = -r["score"]
    metrics = perplexity.statistics(total)
    metrics["chunks"] = float(len(chunks))
    return records, metrics


def _some(items: list[T], ref: TaskRef, data_dir: Path | None = None) -> list[T]:
    """The items, or a one-line error: no items once gave NaN metrics (invalid JSON) or a ZeroDivisionError."""
    if not items:
        where = data_dir or settings.data_dir()  # the folder read (--data), not always KILN_DATA_DIR's
        fix = "write one JSON object a line" if ref.path else f"check its data files under {where}"
        raise DataFormatError(f"{ref.path or ref.name} has no items to evaluate; {fix}")
    return items


def _run_multiple_choice(loaded: LoadedModel | ServedModel, scorer: Scorer, options: EvalOptions, ref: TaskRef,
                         baseline: LoadedModel | None, checkpoint: Checkpoint, done: dict[int, dict[str, Any]],
                         progress: bool) -> TaskResult:
    items = _some(list(itertools.islice(mc_tasks.load(ref.name, options.data_dir, ref.path), options.limit)), ref,
                  options.data_dir)
    _check_choices_fit(loaded, items)

    def work(batch: list[mc_tasks.MCItem]) -> list[dict[str, Any]]:
        return multiple_choice.evaluate_items(scorer, loaded.tokenizer, batch, max_tokens=loaded.spec.max_position)

    # Items of similar length go to the same checkpoint batch, so the scorer's rows need little padding
    # (in order, PIQA's 64-item batches mixed 5- and 100-token solutions: 1.5x the time). Records come
    # back sorted by index.
    by_length = sorted(items, key=lambda it: (max(map(len, it.choices)), len(it.context)))
    records = _process(by_length, done, lambda it: it.index, 64, work, checkpoint, ref.name, "item", progress)
    return records, multiple_choice.metrics(records)


def _run_completion(loaded: LoadedModel | ServedModel, scorer: Scorer, options: EvalOptions, ref: TaskRef,
                    baseline: LoadedModel | None, checkpoint: Checkpoint, done: dict[int, dict[str, Any]],
                    progress: bool) -> TaskResult:
    items = _some(list(itertools.islice(completion_tasks.load(ref.name, options.data_dir), options.limit)), ref,
                  options.data_dir)
    context = loaded.spec.max_position
    for item in items:  # refused before any scoring, as multiple choice does (a token is at least one byte)
        if len((item.context + item.continuation).encode()) + 4 > context:
            completion.request_for(loaded.tokenizer, item, context)

    def work(batch: list[completion_tasks.CompletionItem]) -> list[dict[str, Any]]:
        return completion.evaluate_items(scorer, loaded.tokenizer, batch, max_tokens=context)

    # similar lengths share a checkpoint batch, as for multiple choice: the scorer's rows then need little padding
    by_length = sorted(items, key=lambda it: len(it.context))
    records = _process(by_length, done, lambda it: it.index, 128, work, checkpoint, ref.name, "item", progress)
    return records, completion.metrics(records)


def _check_choices_fit(loaded: LoadedModel | ServedModel, items: list[mc_tasks.MCItem]) -> None:
    """Refuse, before any scoring, an item whose context and a choice are longer than the model's context: it
    was refused only when its checkpoint batch came, the longest last, after every shorter item was scored.
    A token is at least one byte, so only items with more bytes than the context (a few tokens spare for
    BOS) are tokenized here."""
    context = loaded.spec.max_position
    for item in items:
        if any(len((item.context + item.delimiter + c).encode()) + 4 > context for c in item.choices):
            multiple_choice.requests_for(loaded.tokenizer, item, context)  # raises ContextLengthError naming it


def _check_prompts_fit(loaded: LoadedModel | ServedModel, items: list[gen_tasks.GenItem]) -> None:
    """Refuse, before any generation, an item whose prompt leaves no room for one token: the engine refused
    it only when its batch came, after the items before it, without saying which item it was."""
    context = loaded.spec.max_position
    for item in items:
        n = len(generation.prompt_ids(loaded.tokenizer, item))
        if n >= context:
            raise ContextLengthError(f"{item.where or f'item {item.index}'}: the prompt is {n} tokens, and the "
                                     f"model's context of {context} leaves no room for an answer; shorten it")


def _run_generation(loaded: LoadedModel | ServedModel, generator: TextGenerator, options: EvalOptions, ref: TaskRef,
                    checkpoint: Checkpoint, done: dict[int, dict[str, Any]], progress: bool) -> TaskResult:
    source = gen_tasks.squad(options.data_dir) if ref.name == "squad" else gen_tasks.custom(ref.path or Path())
    items = _some(list(itertools.islice(source, options.limit)), ref, options.data_dir)
    _check_prompts_fit(loaded, items)
    stop = ("\n",) if ref.name == "squad" else ()

    def work(batch: list[gen_tasks.GenItem]) -> list[dict[str, Any]]:
        return generation.evaluate_items(generator, batch, options.max_new_tokens, len(batch), stop)

    records = _process(items, done, lambda it: it.index, options.batch_size or 8, work, checkpoint, ref.name,
                       "item", progress)
    return records, generation.metrics(records, with_overlap=ref.name != "squad")
