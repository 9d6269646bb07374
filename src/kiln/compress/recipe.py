"""Compression recipes: an ordered list of steps, each with validated parameters, read from TOML or flags.

    [calibration]            # optional; defaults shown
    file = "wikitext-2-raw/wiki.valid.raw"
    samples = 128
    tokens = 512
    seed = 0

    [[step]]
    kind = "quantize"        # quantize | prune | lowrank | distill
    bits = 4                 # 8 or 4
    method = "gptq"          # rtn | gptq | awq | smoothquant (W8A8)
    group_size = 128
    symmetric = false
    zero_point = "float"     # int4 asymmetric: "float" offset (Q4_1's) or "integer" zero point (GPTQ's, AWQ's)
    keep_embeddings = true   # embeddings and lm_head stay in full precision
    head_bits = 0            # with keep_embeddings = false: 0 = the step's bits, 8 = int8 (for int4 steps)
    target = "model"         # gptq, awq: aim at the uncompressed model's outputs (or "layer": each layer's own)
    refit = 2                # gptq int4: refit the group scales and offsets to the chosen integers

Validation happens before any work: an error names the field, the value and the allowed values.
"""

from __future__ import annotations

import math
import tomllib
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from kiln.errors import KilnError


class RecipeError(KilnError):
    """A recipe field has a value kiln cannot use."""


def _choice(where: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise RecipeError(f"{where}: {name} = {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")


def _unread(where: str, step: Any) -> None:
    """Refuse a field written away from its default that the step, as configured, does not read: 2:4 at
    sparsity 0.7 pruned half, and group_size = 32 at 8 bits made a per-channel grid, without a word. A
    default value passes, so a recipe copied from an artifact's manifest reads back."""
    for name, why in (step.ignored() if isinstance(step, Quantize | Prune) else {}).items():
        value = getattr(step, name)
        if value != next(f.default for f in fields(step) if f.name == name):
            raise RecipeError(f"{where}: {name} = {value!r} is not read {why}; leave {name} out")


def _range(where: str, name: str, value: Any, low: float, high: float, kind: type = float) -> None:
    ok = isinstance(value, kind | int) and not isinstance(value, bool) if kind is float else (
        isinstance(value, int) and not isinstance(value, bool))
    if not ok or not low <= value <= high:
        noun = "a number" if kind is float else "an integer"  # not "a int"
        raise RecipeError(f"{where}: {name} = {value!r} is not allowed; use {noun} in [{low}, {high}]")


@dataclass(frozen=True)
class Calibration:
    """Text the calibration-based steps (GPTQ, AWQ, SmoothQuant, Wanda, importance) read."""

    file: str = "wikitext-2-raw/wiki.valid.raw"  # under the data folder, or an absolute path
    samples: int = 128  # sequences (GPTQ's drift correction at int4 g128: 64 -> 128 took Δppl from 10.5% to 7.7%)
    tokens: int = 512  # tokens per sequence
    seed: int = 0

    def check(self) -> None:
        _range("calibration", "samples", self.samples, 1, 100_000, int)
        _range("calibration", "tokens", self.tokens, 8, 65_536, int)


@dataclass(frozen=True)
class Quantize:
    bits: int = 8  # 8: per-output-channel symmetric; 4: group-wise
    method: str = "rtn"  # rtn | gptq | awq | smoothquant (W8A8: int8 weights and dynamic int8 activations)
    group_size: int = 128  # int4 only: inputs per scale
    symmetric: bool = False  # int4 only: symmetric grid (no zero point)
    # int4 asymmetric only: each group's offset is its minimum ("float", llama.cpp's Q4_1) or -z * scale with z
    # an integer in 0..15 ("integer", as GPTQ / AWQ checkpoints store it), which ONNX Runtime's MatMulNBits
    # runs on its fast kernels while float offsets take extra nodes
    zero_point: str = "float"
    keep_embeddings: bool = True  # keep the embedding and lm_head unquantized
    # bits of a quantized embedding / lm_head: 0 = the step's own; 8 under an int4 step is what llama.cpp
    # does with its output matrix (8 or 6 bits): a quarter of fp32's bytes, which a decode step reads in full
    head_bits: int = 0
    alpha: float = 0.5  # smoothquant: migration strength
    damp: float = 0.01  # gptq; awq with target = "model": fraction of the mean Hessian diagonal added for stability
    refit: int = 2  # gptq, int4: refit the group grids to the chosen integers this many times
    # gptq, awq: match the uncompressed model's outputs (model) or each layer's own (layer; the papers' algorithms).
    # GPTQ corrects every layer for its inputs' drift; AWQ only each block's first (compress/pipeline.py says why)
    target: str = "model"

    def check(self, where: str) -> None:
        _choice(where, "bits", self.bits, (8, 4))
        _choice(where, "method", self.method, ("rtn", "gptq", "awq", "smoothquant"))
        if self.bits == 4:
            _choice(where, "group_size", self.group_size, (32, 64, 128))
        _choice(where, "zero_point", self.zero_point, ("float", "integer"))
        if self.method == "smoothquant" and self.bits != 8:
            raise RecipeError(f"{where}: method = 'smoothquant' is W8A8; set bits = 8")
        if self.method == "awq" and self.bits != 4:
            raise RecipeError(f"{where}: method = 'awq' protects salient channels at 4 bits; set bits = 4")
        _choice(where, "head_bits", self.head_bits, (0, 8))
        if self.head_bits and self.keep_embeddings:
            raise RecipeError(f"{where}: head_bits = {self.head_bits} quantizes the embedding and lm_head; "
                              "set keep_embeddings = false with it")
        _range(where, "alpha", self.alpha, 0.0, 1.0)
        _range(where, "damp", self.damp, 0.0, 1.0)
        _range(where, "refit", self.refit, 0, 10, int)
        _choice(where, "target", self.target, ("layer", "model"))

    @property
    def integer_zero(self) -> bool:
        """Whether the int4 groups' offsets are integer zero points (-z * scale) rather than float minima."""
        return self.bits == 4 and not self.symmetric and self.zero_point == "integer"

    def ignored(self) -> dict[str, str]:
        """The fields these settings do not read, each with why."""
        ignored: dict[str, str] = {}
        if self.bits == 8:
            ignored.update(group_size="at bits = 8 (one scale per output channel)",
                           symmetric="at bits = 8 (its grid is always symmetric)",
                           zero_point="at bits = 8 (its grid is always symmetric)")
        elif self.symmetric:
            ignored["zero_point"] = "with symmetric = true (its zero point is always 8)"
        if self.method != "smoothquant":
            ignored["alpha"] = f"by method = {self.method!r} (it is SmoothQuant's)"
        if self.method == "awq":
            ignored["refit"] = "by method = 'awq' (it is GPTQ's)"
            if self.target == "layer":  # AWQ damps only its first layers' least-squares aim at the model
                ignored["damp"] = "by method = 'awq' with target = 'layer' (nothing is aimed at the model)"
        elif self.method != "gptq":
            ignored.update({name: f"by method = {self.method!r} (it is GPTQ's and AWQ's)"
                            for name in ("damp", "refit", "target")})
        return ignored


@dataclass(frozen=True)
class Prune:
    sparsity: float = 0.5  # fraction removed (unstructured), ignored for 2:4
    method: str = "magnitude"  # magnitude | wanda | 2:4 | heads | channels | layers
    score: str = "wanda"  # 2:4 only: which score picks the 2 kept of every 4 (magnitude | wanda)

    def check(self, where: str) -> None:
        _choice(where, "method", self.method, ("magnitude", "wanda", "2:4", "heads", "channels", "layers"))
        _choice(where, "score", self.score, ("magnitude", "wanda"))
        _range(where, "sparsity", self.sparsity, 0.0, 0.95)
        # every method but 2:4 reads sparsity, and at 0.0 it removed nothing while the manifest said pruned
        if self.method != "2:4" and self.sparsity == 0:
            raise RecipeError(f"{where}: sparsity = {self.sparsity!r} removes nothing by method = {self.method!r}; "
                              "use a number in (0.0, 0.95]")

    def ignored(self) -> dict[str, str]:
        """The fields these settings do not read, each with why."""
        if self.method == "2:4":
            return {"sparsity": "by method = '2:4' (it removes 2 of every 4 weights: 0.5)"}
        return {"score": f"by method = {self.method!r} (it picks 2:4's kept weights)"}


@dataclass(frozen=True)
class LowRank:
    rank: int | None = None  # keep this many singular values ...
    energy: float | None = None  # ... or the fewest whose squared sum reaches this fraction
    targets: tuple[str, ...] = ("mlp",)  # which linear layers: mlp | attn | all
    recover_steps: int = 0  # distillation steps afterwards (0 = none)

    def check(self, where: str) -> None:
        if (self.rank is None) == (self.energy is None):
            raise RecipeError(f"{where}: set exactly one of rank or energy")
        if self.rank is not None:
            _range(where, "rank", self.rank, 1, 65_536, int)
        if self.energy is not None:
            _range(where, "energy", self.energy, 0.01, 1.0)
        if not self.targets:  # no layer was chosen, and the run ended in "no layer gets smaller ...; lower it"
            raise RecipeError(f"{where}: targets = [] chooses no layer; list one or more of 'mlp', 'attn', 'all'")
        for t in self.targets:
            _choice(where, "targets", t, ("mlp", "attn", "all"))
        _range(where, "recover_steps", self.recover_steps, 0, 10_000_000, int)


@dataclass(frozen=True)
class Distill:
    student_layers: int | None = None  # keep this many teacher layers, evenly spaced
    steps: int = 200
    time_budget_s: float | None = None  # stop when this many seconds have passed
    lr: float = 1e-4
    temperature: float = 2.0
    ce_weight: float = 0.0  # weight of the cross-entropy on the data next to the KL term
    batch_size: int = 4
    seq_len: int = 256
    data: str = "calibration"  # what the student trains on: the [calibration] file's text (the only source yet)
    precision: str = "bf16"  # matmuls under bf16 autocast (weights and optimizer stay fp32) | fp32

    def check(self, where: str) -> None:
        if self.student_layers is not None:
            _range(where, "student_layers", self.student_layers, 1, 1024, int)
        _range(where, "steps", self.steps, 1, 10_000_000, int)
        # finite too: inf ran as no budget and went into the manifest as Infinity, which strict JSON readers refuse
        if self.time_budget_s is not None and not 0 < self.time_budget_s < math.inf:
            raise RecipeError(f"{where}: time_budget_s = {self.time_budget_s!r} is not allowed; use a number of "
                              "seconds above 0 (or leave it out: steps ends the run)")
        _range(where, "lr", self.lr, 1e-8, 1.0)
        _range(where, "temperature", self.temperature, 0.1, 100.0)
        _range(where, "ce_weight", self.ce_weight, 0.0, 100.0)
        _range(where, "batch_size", self.batch_size, 1, 4096, int)
        _range(where, "seq_len", self.seq_len, 8, 65_536, int)
        # "generated" (text the teacher writes) was allowed but nothing wrote it: the run trained on the
        # calibration file and the manifest said generated
        _choice(where, "data", self.data, ("calibration",))
        _choice(where, "precision", self.precision, ("bf16", "fp32"))


UNSTRUCTURED = ("magnitude", "wanda", "2:4")  # prune methods that zero weights and leave the shapes as they are
STEP_TYPES: dict[str, type] = {"quantize": Quantize, "prune": Prune, "lowrank": LowRank, "distill": Distill}
Step = Quantize | Prune | LowRank | Distill


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        if not self.steps:
            raise RecipeError("the recipe has no steps; add at least one [[step]] with a kind")
        self.calibration.check()
        for i, step in enumerate(self.steps, start=1):
            step.check(f"step {i} ({kind_of(step)})")
        self._check_sparsity_survives()
        quantized = [i for i, s in enumerate(self.steps) if isinstance(s, Quantize)]
        if len(quantized) > 1 or (quantized and quantized[0] != len(self.steps) - 1):
            raise RecipeError("quantize must be the one last step: prune and distill come before it")
        self._check_after_lowrank()

    def _check_after_lowrank(self) -> None:
        """Quantize and prune read full-precision matrices and a distilled student copies plain ones, so after
        a factorisation they ended in an AssertionError or a failed backward pass, after the SVDs had run."""
        kinds = [kind_of(s) for s in self.steps]
        if "lowrank" not in kinds:
            return
        first = kinds.index("lowrank")
        later = next((k for k in kinds[first + 1:] if k != "lowrank"), None)
        if later is not None:
            raise RecipeError(f"step {first + 1} (lowrank) is followed by {later}, which cannot read factorised "
                              "layers; put lowrank last (its recover_steps distil it afterwards), or drop it")

    def _check_sparsity_survives(self) -> None:
        """Unstructured pruning zeroes weights in place; a later step that trains (distill, or lowrank with
        recover_steps) updates every weight and filled the zeros back in, while the manifest kept the sparsity."""
        for i, step in enumerate(self.steps, start=1):
            if not (isinstance(step, Prune) and step.method in UNSTRUCTURED):
                continue
            for j, later in enumerate(self.steps[i:], start=i + 1):
                if isinstance(later, Distill) or (isinstance(later, LowRank) and later.recover_steps):
                    raise RecipeError(
                        f"step {i} (prune {step.method}) comes before step {j} ({kind_of(later)}), whose training "
                        "fills the pruned weights back in; put the prune step after it")

    def to_dict(self) -> dict[str, Any]:
        return {"calibration": asdict(self.calibration),
                "steps": [{"kind": kind_of(s), **asdict(s)} for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        unknown = set(data) - {"step", "steps", "calibration"}
        if unknown:
            raise RecipeError(f"{where}: unknown table {sorted(unknown)[0]!r}; use [calibration] and [[step]]")
        if "step" in data and "steps" in data:  # one was read and the other's steps dropped without a word
            raise RecipeError(f"{where}: both [[step]] and [[steps]] tables; put every step in [[step]] tables")
        raw_steps = data.get("step", data.get("steps", []))
        if not isinstance(raw_steps, list):
            raise RecipeError(f"{where}: steps must be an array of tables ([[step]])")
        steps = [_build_step(s, f"{where} step {i}") for i, s in enumerate(raw_steps, start=1)]
        calibration = data.get("calibration", {})
        if not isinstance(calibration, dict):
            raise RecipeError(f"{where}: [calibration] must be a table of file, samples, tokens and seed")
        calibration = _build(Calibration, calibration, f"{where} [calibration]")
        recipe = cls(tuple(steps), calibration)
        for i, step in enumerate(recipe.steps, start=1):  # a file's values; code passes what it means
            _unread(f"{where} step {i} ({kind_of(step)})", step)
        return recipe

    @classmethod
    def from_toml(cls, path: Path) -> Recipe:
        if path.is_dir():
            raise RecipeError(f"recipe {path} is a folder; pass a TOML file with [[step]] tables")
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist; pass a TOML file with [[step]] tables")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:  # TOML is UTF-8; another encoding was a traceback
            raise RecipeError(f"recipe {path} cannot be read as UTF-8 text ({exc}); save it as UTF-8 TOML") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
        return cls.from_dict(data, str(path))


def read_sweep(path: Path) -> list[tuple[str, Recipe]]:
    """A sweep file's [[artifact]] recipes with their names, each the name of a folder under the output."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the sweep ({exc})") from exc
    unknown = sorted(set(data) - {"artifact"})
    if unknown:
        raise RecipeError(f"{path}: unknown table {unknown[0]!r}; a sweep holds [[artifact]] tables only")
    entries = data.get("artifact")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise RecipeError(f"{path}: expected [[artifact]] tables, each with a name and [[artifact.step]]s")
    sweep: list[tuple[str, Recipe]] = []
    for i, entry in enumerate(entries, start=1):
        name = entry.get("name")
        # the name is joined to -o: a path in it wrote elsewhere, and a repeated one replaced its twin's artifact
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise RecipeError(f"{path} artifact {i}: name = {name!r} is not allowed; use a folder name (no /) "
                              "for its artifact under -o")
        if name in (n for n, _ in sweep):
            raise RecipeError(f"{path}: two artifacts are named {name!r}; give each its own name")
        recipe = Recipe.from_dict({k: v for k, v in entry.items() if k != "name"}, f"{path} artifact {name!r}")
        sweep.append((name, recipe))
    return sweep


def kind_of(step: Step) -> str:
    return next(k for k, t in STEP_TYPES.items() if isinstance(step, t))


def _build_step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict) or "kind" not in raw:
        raise RecipeError(f"{where}: each step needs a kind ({', '.join(STEP_TYPES)})")
    kind = raw["kind"]
    _choice(where, "kind", kind, tuple(STEP_TYPES))
    return _build(STEP_TYPES[kind], {k: v for k, v in raw.items() if k != "kind"}, where)


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        name = sorted(unknown)[0]
        raise RecipeError(f"{where}: unknown field {name!r}; the fields are {', '.join(sorted(names))}")
    hints = get_type_hints(cls)
    for name, value in raw.items():
        _check_type(where, name, value, hints[name])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


# what a TOML value of each field type must be, and how an error names it
_TYPES: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    tuple[str, ...]: (lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
                      "a list of strings"),
}


def _check_type(where: str, name: str, value: Any, hint: Any) -> None:
    """The field's annotation is the contract: a string where a bool goes was taken as true, and a string
    where a number goes failed with a traceback only once the model had loaded."""
    allowed = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is types.UnionType else [hint]
    if value is None and len(allowed) < len(get_args(hint)):
        return
    checks = [_TYPES[a] for a in allowed]
    if not any(ok(value) for ok, _ in checks):
        raise RecipeError(f"{where}: {name} = {value!r} is not allowed; use {' or '.join(d for _, d in checks)}")
