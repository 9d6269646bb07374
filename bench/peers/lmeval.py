"""EleutherAI lm-evaluation-harness (0.4.x, `hf` backend) run as a peer on the items kiln evaluates.

Installs lm-eval into a scratch venv outside the repo, writes custom task YAMLs that read the local
files in the shared data folder with lm-eval's official prompt formats, runs each task in its own
process (so each gets a wall time) and parses lm-eval's results JSON. Scoring is left to lm-eval.

    .venv/bin/python bench/peers/lmeval.py install
    .venv/bin/python bench/peers/lmeval.py run --model FOLDER --tasks kiln_arc_easy,kiln_piqa --limit 500 \\
        --batch-size 16 --json-out bench/results/lmeval.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.errors import DataNotFoundError, InvalidParameterError, KilnError

TORCH_PIN = "torch==2.13.0"  # any other torch requirement pulls a multi-GB CUDA build on these machines
TASKS = ("kiln_hellaswag", "kiln_arc_easy", "kiln_arc_challenge", "kiln_piqa", "kiln_lambada_openai")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
METRICS_YAML = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# Runs lm-eval's CLI in-process after fixing torch's thread count; argv[1] is the thread count.
LAUNCHER = ("import runpy, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "print(f'torch threads: {torch.get_num_threads()}', file=sys.stderr); "
            "sys.argv = ['lm_eval', *sys.argv[2:]]; runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)")
# process_docs for kiln_hellaswag: lm-eval's own preprocess, imported from the installed package.
HELLASWAG_UTILS = '''from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    def _process(doc):
        return {"query": preprocess(doc["ctx"]), "choices": [preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(_process)
'''


class PeerFailedError(KilnError):
    """The lm-eval subprocess exited non-zero; its log says why."""


def bench_dir() -> Path:
    """KILN_BENCH_DIR: scratch space for peer tools (venvs, task files, logs); never inside the repo."""
    return Path(os.environ.get("KILN_BENCH_DIR") or Path.home() / ".cache" / "kiln-bench")


# ---------------------------------------------------------------------------------------------- install


def pip(python: Path, *args: str) -> str:
    proc = subprocess.run([str(python), "-m", "pip", *args], check=True, capture_output=True, text=True)
    return proc.stdout


def latest_release(python: Path, spec: str) -> str:
    """The newest lm-eval release matching `spec` (e.g. '0.4.*'), as resolved by pip against the index."""
    report = json.loads(pip(python, "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
                            "--report", "-", f"lm-eval=={spec}"))
    return report["install"][0]["metadata"]["version"]


def ensure_lmeval(version: str = "0.4.*") -> Path:
    """Create (once) a venv with torch 2.13.0 CPU, then lm-eval[hf] at the newest `version` release; its python.

    torch goes in first so lm-eval's `torch>=1.8` is already met and pip never fetches a CUDA build.
    transformers is pinned to the version of the calling environment when it has one, so both peers
    run the same model code. Idempotent: a marker file records the spec it was built for.
    """
    venv = bench_dir() / "lmeval-venv"
    python, marker = venv / "bin" / "python", venv / "kiln-lmeval.json"
    if python.exists() and marker.exists() and json.loads(marker.read_text()).get("spec") == version:
        return python
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(python, "install", "--quiet", TORCH_PIN)
    release = latest_release(python, version)
    extra = [f"transformers=={v}"] if (v := local_version("transformers")) else []
    pip(python, "install", "--quiet", TORCH_PIN, f"lm-eval[hf]=={release}", *extra)
    marker.write_text(json.dumps({"spec": version, "lm_eval": release, **venv_versions(python)}, indent=1))
    return python


def local_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def venv_versions(python: Path) -> dict[str, str]:
    """Versions of the packages that decide the peer's numbers, read inside the scratch venv."""
    code = ("import json, platform; from importlib import metadata as m; print(json.dumps({'python': "
            "platform.python_version(), **{p: m.version(p) for p in ('lm_eval', 'torch', 'transformers', "
            "'accelerate', 'datasets')}}))")
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


# ---------------------------------------------------------------------------------------------- tasks


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def arc_docs(path: Path) -> list[dict[str, Any]]:
    """ARC in the Hugging Face allenai/ai2_arc layout, so lm-eval's arc templates apply unchanged."""
    docs = []
    for row in read_jsonl(path):
        choices = row["question"]["choices"]
        docs.append({"id": row["id"], "question": row["question"]["stem"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                     "answerKey": row["answerKey"]})
    return docs


def piqa_docs(folder: Path) -> list[dict[str, Any]]:
    """PIQA validation in the baber/piqa layout: goal, sol1, sol2, label (0 = sol1)."""
    rows = read_jsonl(folder / "valid.jsonl")
    labels = (folder / "valid-labels.lst").read_text().split()
    assert len(labels) == len(rows), (len(labels), len(rows))
    return [{**row, "label": int(label)} for row, label in zip(rows, labels, strict=True)]


def hellaswag_docs(path: Path) -> list[dict[str, Any]]:
    """llama.cpp text format, 6 lines per item: 'activity_label: ctx', gold index, 4 endings (not yet preprocessed)."""
    lines = path.read_text().split("\n")
    num_items = len(lines) // 6
    assert lines[num_items * 6 :] in ([], [""]), "hellaswag file is not 6 lines per item"
    return [{"ctx": lines[6 * i], "label": lines[6 * i + 1].strip(), "endings": lines[6 * i + 2 : 6 * i + 6]}
            for i in range(num_items)]


def task_yaml(name: str, data_file: Path, split: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {json.dumps(str(data_file))}\n"
            f"output_type: multiple_choice\n{split}_split: {split}\n{body}target_delimiter: \" \"\n{METRICS_YAML}")


def lambada_yaml(name: str, data_file: Path) -> str:
    """lm-eval's lambada_openai (output_type loglikelihood, perplexity and acc) on the llm-foundry file, whose
    context and continuation are the official task's text without its last word and that word."""
    return (f"task: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
            "output_type: loglikelihood\ntest_split: test\ndoc_to_text: \"{{context}}\"\n"
            "doc_to_target: \"{{' ' + continuation}}\"\nmetric_list:\n  - metric: perplexity\n"
            "    aggregation: perplexity\n    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n"
            "    higher_is_better: true\nmetadata:\n  version: 1.0\n")


ARC_BODY = ('doc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n')
PIQA_BODY = 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
HELLASWAG_BODY = ('process_docs: !function utils.process_docs\ndoc_to_text: "{{query}}"\n'
                  'doc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n')


def write_tasks(out: Path | None = None, data: Path | None = None) -> Path:
    """Write the kiln_* task YAMLs, their jsonl data (file order kept) and utils.py into `out`; return it.

    Templates, delimiter and metrics are those of lm-eval's arc_easy, piqa and hellaswag YAMLs. The ARC and
    PIQA docs take the Hugging Face layouts those templates expect; hellaswag docs carry the raw lines and
    lm-eval's preprocess runs in process_docs, as in the official task.
    """
    out, data = out or bench_dir() / "lmeval-tasks", data or settings.data_dir()
    for part in ("arc", "piqa", "hellaswag"):
        if not (data / part).is_dir():
            raise DataNotFoundError(f"no {part}/ folder in {data}; set KILN_DATA_DIR to the shared data folder")
    (out / "data").mkdir(parents=True, exist_ok=True)
    sources = {
        "kiln_arc_easy": ("test", arc_docs(data / "arc" / "ARC-Easy-Test.jsonl"), ARC_BODY),
        "kiln_arc_challenge": ("test", arc_docs(data / "arc" / "ARC-Challenge-Test.jsonl"), ARC_BODY),
        "kiln_piqa": ("validation", piqa_docs(data / "piqa"), PIQA_BODY),
        "kiln_hellaswag": ("validation", hellaswag_docs(data / "hellaswag" / "hellaswag_val_full.txt"),
                           HELLASWAG_BODY),
    }
    for name, (split, docs, body) in sources.items():
        data_file = out / "data" / f"{name}.jsonl"
        write_if_changed(data_file, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        write_if_changed(out / f"{name}.yaml", task_yaml(name, data_file, split, body))
    write_if_changed(out / "utils.py", HELLASWAG_UTILS)
    lambada = data / "extras" / "lambada_openai_llmfoundry.jsonl"
    if lambada.is_file():  # the file as it is: its rows are already the docs
        write_if_changed(out / "kiln_lambada_openai.yaml", lambada_yaml("kiln_lambada_openai", lambada))
    return out


def write_if_changed(path: Path, text: str) -> None:
    """Leave unchanged files untouched: the datasets cache keys on their modification time."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------------------------------------- run


def run(model_folder: Path, tasks: list[str], limit: int, batch_size: int | str = 16, threads: int = 2,
        dtype: str = "float32", log_samples: bool = True) -> dict[str, Any]:
    """Run each task in its own lm-eval process on the first `limit` items; metrics and wall time per task.

    Per-sample logs (every choice's summed log-likelihood) land beside the results JSON in
    <bench dir>/lmeval-runs/<run id>/<task>/.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise InvalidParameterError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if not (model_folder / "config.json").is_file():
        raise InvalidParameterError(f"{model_folder} has no config.json; pass a Hugging Face model folder")
    python = ensure_lmeval()
    task_dir = write_tasks()
    run_dir = bench_dir() / "lmeval-runs" / time.strftime("%Y%m%d-%H%M%S")
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    report: dict[str, Any] = {"model": str(model_folder), "limit": limit, "batch_size": batch_size,
                              "threads": threads, "dtype": dtype, "versions": venv_versions(python),
                              "run_dir": str(run_dir), "tasks": {}}
    for task in tasks:
        out = run_dir / task
        args = ["--model", "hf", "--model_args", f"pretrained={model_folder},dtype={dtype}", "--tasks", task,
                "--limit", str(limit), "--batch_size", str(batch_size), "--device", "cpu",
                "--output_path", str(out), "--include_path", str(task_dir), *(["--log_samples"] * log_samples)]
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / "lm_eval.log", "w") as log:
            proc = subprocess.run([str(python), "-c", LAUNCHER, str(threads), *args], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise PeerFailedError(f"lm-eval exited {proc.returncode} on {task}; its output is in {out / 'lm_eval.log'}")
        wall_s = time.perf_counter() - start
        report["tasks"][task] = {**parse_results(out, task), "wall_s": round(wall_s, 1)}
        print(f"{task}: {report['tasks'][task]}", file=sys.stderr)
    report["total_wall_s"] = round(sum(t["wall_s"] for t in report["tasks"].values()), 1)
    return report


def parse_results(out: Path, task: str) -> dict[str, Any]:
    """acc, acc_norm (with stderr), item count and lm-eval's own timing from the newest results JSON in `out`."""
    results_path = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    raw = json.loads(results_path.read_text())
    metrics = raw["results"][task]
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr")
    return {
        **{k: metrics[f"{k},none"] for k in keys if f"{k},none" in metrics},
        "n": raw["n-samples"][task]["effective"],
        "eval_s": round(float(raw.get("total_evaluation_time_seconds", "nan")), 1),
        "results_json": str(results_path),
        "samples_jsonl": str(samples[-1]) if samples else None,
    }


def render(report: dict[str, Any]) -> str:
    lines = ["| task | n | acc | acc_norm | perplexity | wall s |", "|---|---|---|---|---|---|"]

    def shown(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.4f} ± {r[key + '_stderr']:.4f}" if key in r else ""

    for task, r in report["tasks"].items():
        lines.append(f"| {task} | {r['n']} | {shown(r, 'acc')} | {shown(r, 'acc_norm')} | {shown(r, 'perplexity')} "
                     f"| {r['wall_s']:.0f} |")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return "\n".join(lines) + (
        f"\n\nlm-eval hf backend, {report['dtype']}, batch size {report['batch_size']}, {report['threads']} threads, "
        f"first {report['limit']} items per task; total {report['total_wall_s']:.0f} s. {machine()}; {versions}.")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().split("\n")
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------- CLI


def batch_size_arg(text: str) -> int | str:
    if text == "auto" or re.fullmatch(r"auto:\d+", text):
        return text
    return int(text)


def cli_install(args: argparse.Namespace) -> None:
    print(ensure_lmeval(args.version))


def cli_tasks(args: argparse.Namespace) -> None:
    print(write_tasks())


def cli_run(args: argparse.Namespace) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = run(Path(args.model).resolve(), tasks, args.limit, args.batch_size, args.threads, args.dtype,
                 not args.no_log_samples)
    print(render(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    install = verbs.add_parser("install", help="create the scratch venv with lm-eval; print its python")
    install.add_argument("--version", default="0.4.*", help="lm-eval version spec; the newest match is pinned")
    install.set_defaults(func=cli_install)
    verbs.add_parser("tasks", help="write the kiln_* task YAMLs and data; print the folder").set_defaults(
        func=cli_tasks)
    r = verbs.add_parser("run", help="evaluate a Hugging Face model folder; print a markdown table")
    r.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    r.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    r.add_argument("--limit", type=int, default=500, help="first N items of each task, in file order")
    r.add_argument("--batch-size", type=batch_size_arg, default=16, help="an integer, 'auto' or 'auto:N'")
    r.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--json-out", help="write the full report (metrics, times, log paths, versions) here")
    r.add_argument("--no-log-samples", action="store_true", help="skip lm-eval's per-item logs")
    r.set_defaults(func=cli_run)
    args = parser.parse_args()
    try:
        args.func(args)
    except KilnError as e:
        print(f"bench/peers/lmeval.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
