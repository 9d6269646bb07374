"""`kiln report`: one self-contained HTML page comparing models and artifacts from the runs database.

Inline CSS and inline SVG only (no scripts, fonts or images fetched), so it opens offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from kiln import __version__
from kiln.errors import InvalidParameterError
from kiln.files import write_text
from kiln.report.collect import COMPLETION_COLUMNS, TASK_COLUMNS, ModelSummary, collect, reference_of
from kiln.report.plots import line_svg, scatter_svg
from kiln.report.select import Choice

TEMPLATE = jinja2.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kiln report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem; color: #212529; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #dee2e6; padding: 0.35rem 0.6rem; text-align: right; }
th { background: #f1f3f5; } td.name { text-align: left; font-family: monospace; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; } .plots > div { border: 1px solid #dee2e6; }
.front { color: #d9480f; font-weight: bold; } .muted { color: #868e96; font-size: 0.85rem; }
pre { white-space: pre-wrap; background: #f8f9fa; padding: 0.5rem; }
</style></head><body>
<h1>kiln report</h1>
<p class="muted">{{ models|length }} model(s); generated {{ generated }} by kiln {{ version }}.
{% if reference %}Δppl is relative to <code>{{ reference }}</code>.{% endif %}</p>
<table id="summary"><thead><tr>
<th>model</th><th>size MB</th><th>ppl ± se</th><th>Δppl</th><th>KLD</th>
{% for t in tasks %}<th>{{ t }}<br>acc / acc_norm</th>{% endfor %}
{% for t in completions %}<th>{{ t }}<br>acc / ppl</th>{% endfor %}
<th>decode tok/s (b1)</th><th>TTFT ms (b1)</th><th>RSS MB serving / with loading</th></tr></thead><tbody>
{% for row in rows %}<tr>{% for cell in row %}
<td{% if loop.first %} class="name"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if choice %}<h2>Which one to serve</h2>
<p id="choice">{% if choice.chosen %}<strong><code>{{ choice.chosen }}</code></strong>: {{ choice.reason }}.
{% else %}{{ choice.reason }}.{% endif %}</p>
{% if choice.rejected %}<ul class="muted">{% for name, why in choice.rejected.items() %}
<li><code>{{ name }}</code>: {{ why }}</li>{% endfor %}</ul>{% endif %}{% endif %}
<h2>Quality against cost</h2>
<p class="muted">Orange points and the dashed line are the Pareto front: no other model is better on both axes.</p>
<div class="plots">{% for svg in plots %}<div>{{ svg|safe }}</div>{% endfor %}</div>
{% if served %}<h2>Scored through a server</h2>
<p class="muted">The same tasks scored through <code>kiln eval --api</code>: a server that scores them as kiln
does in-process gives the same figures.</p>
<table id="served"><thead><tr><th>model</th><th>task</th><th>server</th><th>metric</th><th>in-process</th>
<th>served</th></tr></thead><tbody>
{% for row in served %}<tr>{% for cell in row %}<td{% if loop.index <= 3 %} class="name"{% endif %}>{{ cell }}</td>
{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if curves %}<h2>Training curves</h2>
<div class="plots">{% for svg in curves %}<div>{{ svg|safe }}</div>{% endfor %}</div>{% endif %}
<h2>Worst items</h2>
{% for model, task, items, has_got in worst %}<h3>{{ model }} · {{ task }}</h3><table><thead><tr>
<th>#</th><th>score</th><th>input</th><th>expected</th>{% if has_got %}<th>got</th>{% endif %}</tr></thead><tbody>
{% for it in items %}<tr><td>{{ it.index }}</td><td>{{ '%.3f'|format(it.score) }}</td>
<td class="name">{{ it.input|truncate(160) }}</td><td class="name">{{ it.target|truncate(60) }}</td>
{% if has_got %}<td class="name">{{ it.got|truncate(60) }}</td>{% endif %}</tr>{% endfor %}</tbody></table>
{% endfor %}
</body></html>
""",
    autoescape=True,
)


def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def _completions(models: Sequence[ModelSummary]) -> list[str]:
    """The completion tasks (LAMBADA) that any of the models was evaluated on: a column each, none otherwise."""
    return [t for t in COMPLETION_COLUMNS if any(m.metric(t, "acc") is not None for m in models)]


def _rows(models: Sequence[ModelSummary], reference: ModelSummary | None) -> list[list[str]]:
    rows = []
    completions = _completions(models)
    ref_ppl = reference.metric("wikitext2", "ppl") if reference else None
    for m in models:
        ppl, se = m.metric("wikitext2", "ppl"), m.metric("wikitext2", "ppl_stderr")
        delta = m.metric("wikitext2", "delta_ppl_pct")
        if delta is None and ppl is not None and ref_ppl:
            delta = 100 * (ppl / ref_ppl - 1)
        row = [f"{m.name} ({m.sha256[:10]})", _fmt(m.size_bytes / 1e6),
               "–" if ppl is None else f"{ppl:.3f} ± " + ("n/a" if se is None else f"{se:.3f}"),
               "–" if delta is None else f"{delta:+.2f}%",
               _fmt(m.metric("wikitext2", "kld"), 5)]
        for task in TASK_COLUMNS:
            acc, norm = m.metric(task, "acc"), m.metric(task, "acc_norm")
            row.append("–" if acc is None else f"{100 * acc:.1f} / {100 * (norm or 0):.1f}")
        for task in completions:
            acc, ppl = m.metric(task, "acc"), m.metric(task, "ppl")
            row.append("–" if acc is None else f"{100 * acc:.1f} / {_fmt(ppl, 2)}")
        decode = _fmt(m.bench_at(1, "decode_tokens_per_s"))
        if decode != "–" and m.bench_runtime:  # an int4 artifact's speed depends on it (onnxruntime vs torch)
            decode += f" ({m.bench_runtime})"
        row += [decode, _fmt(m.bench_at(1, "ttft_ms"), 0),
                f"{_fmt(m.serving_rss, 0, 1e-6)} / {_fmt(m.peak_rss, 0, 1e-6)}"]
        rows.append(row)
    return rows


SERVED_METRICS = ("ppl", "acc_norm", "acc", "f1")  # the first a task has is shown


def _served(models: Sequence[ModelSummary]) -> list[list[str]]:
    """model, task, server, metric, in-process value, served value: one row per task scored through a server."""
    rows = []
    for m in models:
        for task, run in m.served.items():
            key = next((k for k in SERVED_METRICS if k in run.metrics), None)
            if key is None:
                continue
            mine = m.metric(task, key)
            rows.append([m.name, task, str(run.settings.get("api", "")), key,
                         "–" if mine is None else f"{mine:.4f}", f"{float(run.metrics[key]):.4f}"])
    return rows


def _plots(models: Sequence[ModelSummary]) -> list[str]:
    with_ppl = [m for m in models if m.metric("wikitext2", "ppl") is not None]
    use_ppl = len(with_ppl) >= max(1, len(models) // 2)
    rated = with_ppl if use_ppl else [m for m in models if m.mean_accuracy is not None]

    def quality(m: ModelSummary) -> float:
        value = m.metric("wikitext2", "ppl") if use_ppl else m.mean_accuracy
        assert value is not None
        return value if use_ppl else 100 * value

    label = "wikitext2 perplexity (lower is better)" if use_ppl else "mean acc_norm % (higher is better)"
    plots = []
    if rated:
        plots.append(scatter_svg([(m.size_bytes / 1e6, quality(m)) for m in rated], [m.name for m in rated],
                                 "size on disk, MB", label, True, use_ppl, "quality against size"))
    fast = [m for m in rated if m.bench_at(1, "decode_tokens_per_s") is not None]
    if fast:
        points = [(m.bench_at(1, "decode_tokens_per_s") or 0.0, quality(m)) for m in fast]
        plots.append(scatter_svg(points, [m.name for m in fast], "batch-1 decode, tokens/s", label, False,
                                 use_ppl, "quality against speed"))
    return plots


def _worst(models: Sequence[ModelSummary], per_task: int = 5
           ) -> list[tuple[str, str, list[dict[str, object]], bool]]:
    """Per model and task, its worst items, and whether they record what the model gave: tasks scored by
    likelihood alone (perplexity, LAMBADA) have no answer to show, so their tables leave the column out."""
    out = []
    for m in models:
        for task, run in m.evals.items():
            items = []
            for r in run.worst[:per_task]:
                got = r.get("output")
                if got is None and "prediction_norm" in r and r.get("choices"):
                    got = r["choices"][int(r["prediction_norm"])]
                items.append({"index": r.get("index"), "score": float(r.get("score", 0.0)),
                              "input": str(r.get("input", "")), "target": str(r.get("target", "")),
                              "got": str(got if got is not None else "")})
            if items:
                out.append((m.name, task, items, any(it["got"] for it in items)))
    return out


def render(models: list[str] | None = None, reference: str | None = None, choice: Choice | None = None,
           found: list[ModelSummary] | None = None) -> str:
    if found is None:
        found = collect(models)
    if not found:
        raise InvalidParameterError(
            "no runs recorded" + (f" for {', '.join(models)}" if models else "")
            + "; run `kiln eval` or `kiln bench` first (see `kiln runs`)"
        )
    ref = reference_of(found, reference) or found[0]
    curves = [line_svg({m.name: m.extra["loss_curve"]}, "step", "loss", f"{m.name}: distillation loss")
              for m in found if m.extra.get("loss_curve")]
    return TEMPLATE.render(
        models=found, rows=_rows(found, ref), tasks=TASK_COLUMNS, completions=_completions(found),
        plots=_plots(found), curves=curves,
        worst=_worst(found), served=_served(found), reference=ref.name if len(found) > 1 else None, choice=choice,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
    )


def write(path: Path, models: list[str] | None = None, reference: str | None = None,
          choice: Choice | None = None, found: list[ModelSummary] | None = None) -> Path:
    if path.is_dir():  # IsADirectoryError's traceback before
        raise InvalidParameterError(f"-o {path} is a folder; pass a file name such as {path / 'report.html'}")
    page = render(models, reference, choice, found)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, page)
    except OSError as exc:  # a parent that is a file, a read-only place, a full disk
        raise InvalidParameterError(f"cannot write the report {path} ({exc.strerror}); pass a writable path") from exc
    return path
