"""Gather, per model, the latest result of every eval task and the latest bench from the runs database.

Results scored through a server (`kiln eval --api`) are kept apart from in-process ones: the table and the
choice read kiln's own figures, and the served ones sit beside them as a cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import runs
from kiln.artifact.manifest import Manifest, is_artifact
from kiln.errors import InvalidParameterError

TASK_COLUMNS = ("hellaswag", "arc_easy", "arc_challenge", "piqa")
COMPLETION_COLUMNS = ("lambada_openai",)  # shown where a model was evaluated on them


@dataclass
class ModelSummary:
    name: str
    sha256: str
    size_bytes: int
    evals: dict[str, runs.Run] = field(default_factory=dict)  # task -> latest in-process run
    served: dict[str, runs.Run] = field(default_factory=dict)  # task -> latest run scored through a server
    bench: runs.Run | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. distillation loss curves

    def metric(self, task: str, key: str) -> float | None:
        run = self.evals.get(task)
        value = run.metrics.get(key) if run else None
        return float(value) if isinstance(value, int | float) else None

    def bench_at(self, batch_size: int, key: str) -> float | None:
        if self.bench is None:
            return None
        for row in self.bench.metrics.get("results", []):
            if row["batch_size"] == batch_size:
                return float(row[key])
        return None

    @property
    def bench_runtime(self) -> str | None:
        """The runtime the bench ran on (recorded since --runtime auto; older runs say nothing)."""
        return self.bench.settings.get("runtime") if self.bench is not None else None

    @property
    def bytes_in_memory(self) -> int | None:
        """The weights' bytes once loaded, from the latest bench (None without one)."""
        value = self.bench.metrics.get("bytes_in_memory") if self.bench is not None else None
        return int(value) if isinstance(value, int | float) else None

    @property
    def peak_rss(self) -> float | None:
        """The highest peak RSS over the latest bench's batch sizes (None without one)."""
        rows = self.bench.metrics.get("results", []) if self.bench is not None else []
        return max((float(r["peak_rss_bytes"]) for r in rows), default=None)

    @property
    def serving_rss(self) -> float | None:
        """The peak RSS while the latest bench generated, loading left out (None for a bench that did not
        record it, from before kiln measured it)."""
        rows = self.bench.metrics.get("results", []) if self.bench is not None else []
        values = [float(r["serving_peak_rss_bytes"]) for r in rows if r.get("serving_peak_rss_bytes") is not None]
        return max(values, default=None)

    @property
    def memory_for_budget(self) -> tuple[str, float | None]:
        """What `kiln report --max-memory-mb` holds against the limit: the serving peak where recorded, else the
        peak with loading (which overstates what serving takes)."""
        serving = self.serving_rss
        return ("serving RSS", serving) if serving is not None else ("peak RSS", self.peak_rss)

    @property
    def mean_accuracy(self) -> float | None:
        values = [v for t in TASK_COLUMNS if (v := self.metric(t, "acc_norm")) is not None]
        return sum(values) / len(values) if values else None


def collect(models: list[str] | None = None) -> list[ModelSummary]:
    """One summary per model (in order of first appearance); `models` filters by name or sha256 prefix."""
    found: dict[str, ModelSummary] = {}
    for run in runs.query():
        if models and not any(run.model == m or run.model_sha256.startswith(m) for m in models):
            continue
        summary = found.setdefault(run.model_sha256, ModelSummary(run.model, run.model_sha256, run.model_size_bytes))
        summary.name = run.model  # the latest name given for this hash
        if run.kind == "bench":
            summary.bench = run
        elif run.settings.get("api"):
            summary.served[run.task] = run
        else:
            summary.evals[run.task] = run
    for summary in found.values():
        summary.extra.update(_training_history(summary.name))
    return list(found.values())


def reference_of(found: list[ModelSummary], reference: str | None) -> ModelSummary | None:
    """The summary `reference` names (a model name or sha256 prefix); the first one when none is given.

    A reference that names none of them is refused: the first one stood in without a word, so every Δppl
    was measured against another model (with --model naming only artifacts, against one of them)."""
    named = next((m for m in found if reference in (m.name, m.sha256[: len(reference or "")])), None)
    if reference and found and named is None:
        raise InvalidParameterError(
            f"--reference {reference!r} is none of the models in the report ({', '.join(m.name for m in found)}); "
            "pass one of them, or add it with --model")
    return named or (found[0] if found else None)


def _training_history(name: str) -> dict[str, Any]:
    """The distillation loss curve of an artifact folder (when the model is one that still exists)."""
    folder = Path(name)
    if not is_artifact(folder):
        return {}
    history = Manifest.read(folder).history
    for key in ("distillation", "lowrank_recovery"):
        curve = history.get(key, {}).get("loss_curve") if isinstance(history.get(key), dict) else None
        if curve:
            return {"loss_curve": [tuple(point) for point in curve]}
    return {}
