"""Turn an evaluation outcome into what `kiln eval` prints: a line of metrics, the worst items, JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln import jsonout
from kiln.errors import InvalidParameterError
from kiln.evaluate.runner import EvalOutcome, Metrics
from kiln.files import write_text


def _pm(metrics: Metrics, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """value ± its standard error; "± n/a" where the error is undefined (one item), nothing where there is none."""
    shown = f"{_value(metrics, key) * scale:.{digits}f}"
    if f"{key}_stderr" not in metrics:
        return shown
    err = metrics[f"{key}_stderr"]
    return shown + (" ± n/a" if err is None else f" ± {err * scale:.{digits}f}")


def _value(metrics: Metrics, key: str) -> float:
    value = metrics[key]
    assert value is not None  # only standard errors are ever None
    return value


def text(outcome: EvalOutcome) -> str:
    m = outcome.metrics
    if outcome.kind == "perplexity":
        head = (f"{outcome.task}: ppl {_pm(m, 'ppl', digits=4)} ({int(_value(m, 'chunks'))} chunks x "
                f"{outcome.settings['ctx']} tokens, {int(_value(m, 'tokens_scored')):,} scored)")
        if "kld" in m:
            head += (f"\n  baseline ppl {_pm(m, 'ppl_base', digits=4)}; Δppl {_pm(m, 'delta_ppl', digits=4)} "
                     f"({m['delta_ppl_pct']:+.2f}%)\n  mean KLD {_pm(m, 'kld', digits=6)}, "
                     f"median {m['kld_median']:.6f}, 99% {m['kld_p99']:.6f}; "
                     f"same top-1 {_pm(m, 'same_top1', 100, 2)} %")
    elif outcome.kind == "multiple_choice":
        head = (f"{outcome.task}: acc {_pm(m, 'acc', 100)}  acc_norm {_pm(m, 'acc_norm', 100)}  "
                f"({len(outcome.records)} items)")
    elif outcome.kind == "completion":
        head = (f"{outcome.task}: ppl {_pm(m, 'ppl', digits=4)}  acc {_pm(m, 'acc', 100)}  "
                f"({len(outcome.records)} items)")
    else:
        parts = [f"{k} {m[k]:.2f}" for k in ("exact_match", "f1", "bleu", "rouge_l") if k in m]
        head = f"{outcome.task}: " + "  ".join(parts) + f"  ({len(outcome.records)} items)"
    rate = len(outcome.records) / outcome.seconds if outcome.seconds > 0 else 0.0
    api = outcome.settings.get("api")
    return head + f"\n  {outcome.seconds:.1f} s, {rate:.2f} items/s" + (f", scored through {api}" if api else "")


def worst_text(outcome: EvalOutcome, n: int = 5) -> str:
    lines = [f"worst {n} items:"]
    for r in outcome.worst(n):
        shown = " ".join(str(r.get("input", "")).split())[:90]
        detail = f"output {r['output']!r}" if "output" in r else f"target {str(r.get('target', ''))[:40]!r}"
        lines.append(f"  #{r['index']:<5} score {r['score']:+.3f}  {shown!r}  {detail}")
    return "\n".join(lines)


def as_json(outcome: EvalOutcome, model: str, sha256: str) -> str:
    data: dict[str, Any] = {"task": outcome.task, "model": model, "model_sha256": sha256,
                            **outcome.metrics, "num_items": len(outcome.records), "seconds": round(outcome.seconds, 3)}
    return jsonout.dumps(data)  # a model with NaN outputs has a NaN perplexity: null, not invalid JSON


def check_samples_path(path: Path, task_file: Path | None = None) -> None:
    """Refuse a --samples path that cannot take the file, or that is the task's own file (mc:/gen:), which the
    samples replaced without a word, before the evaluation rather than after it."""
    if task_file is not None and path.is_file() and task_file.is_file() and path.samefile(task_file):
        raise InvalidParameterError(f"--samples {path} is the task's data file, which the samples would replace; "
                                    "pass another file name")
    if path.is_dir():
        raise InvalidParameterError(f"--samples {path} is a folder; pass a file name such as {path / 'samples.jsonl'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidParameterError(f"--samples {path}: {parent} is a file, not a folder; pass another path")
            break


def write_samples(outcome: EvalOutcome, path: Path) -> None:
    """One JSON record per item, written whole or not at all."""
    text = "".join(jsonout.dumps({"task": outcome.task, **r}) + "\n" for r in outcome.records)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    except OSError as exc:  # a read-only folder or a full disk: one line (the result is already in kiln runs)
        raise InvalidParameterError(f"cannot write --samples {path} ({exc.strerror}); pass a writable path") from exc
