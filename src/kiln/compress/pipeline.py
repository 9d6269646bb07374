"""`kiln compress`: load a model, run a recipe's steps in order, write a self-describing artifact.

Each step changes the graph in place: pruning zeroes or removes weights, low-rank factorisation and
quantization swap in compressed layers (kiln.compress.quantize.qlinear), distillation replaces the
model by a trained student. Calibration-based steps walk the blocks in order (kiln.compress.blocks).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kiln.artifact import io
from kiln.artifact.manifest import Manifest
from kiln.compress import calibration, distill, lowrank
from kiln.compress.blocks import LINEARS, BlockWalker
from kiln.compress.calibration import CalibrationSet
from kiln.compress.prune import structured, unstructured
from kiln.compress.quantize import awq, gptq, smoothquant
from kiln.compress.quantize.qlinear import LAYER_KINDS, Int4Linear, Int8Linear, QuantEmbedding, W8A8Linear
from kiln.compress.recipe import Distill, LowRank, Prune, Quantize, Recipe, Step, kind_of
from kiln.errors import Interrupted, InvalidParameterError, ModelFormatError
from kiln.model.llama import Block, LlamaModel
from kiln.model.load import LoadedModel, load, read_config
from kiln.model.source import resolve
from kiln.model.spec import ModelSpec


@dataclass
class Context:
    """What the steps share: the model being compressed, its tokenizer, calibration data, a log."""

    loaded: LoadedModel
    recipe: Recipe
    data_dir: Path | None
    progress: bool
    calibration: CalibrationSet | None = None
    text: torch.Tensor | None = None  # the whole calibration file's tokens (distillation), read once
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> LlamaModel:
        return self.loaded.model

    def calib(self) -> CalibrationSet:
        if self.calibration is None:
            self.calibration = calibration.load(self.recipe.calibration, self.loaded.tokenizer, self.data_dir)
        return self.calibration

    def walker(self, reference: bool = False) -> BlockWalker:
        return BlockWalker(self.model, self.calib().tokens, reference=reference)

    def blocks(self, desc: str) -> tqdm:
        return tqdm(range(len(self.model.layers)), desc=desc, unit="block", disable=None if self.progress else True)


def _block(model: LlamaModel, i: int) -> Block:
    block = model.layers[i]
    assert isinstance(block, Block)
    return block


def _linear(block: Block, name: str) -> nn.Linear:
    layer = block.get_submodule(name)
    assert isinstance(layer, nn.Linear), f"{name} is already compressed"
    return layer


def _set(block: Block, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent), attr, module)


# --- quantization -------------------------------------------------------------------------------------


def _quantized(layer: nn.Linear, step: Quantize) -> nn.Module:
    if step.bits == 8:
        return Int8Linear.from_float(layer)
    return Int4Linear.from_float(layer, step.group_size, step.symmetric, integer_zero=step.integer_zero)


def _quantize_head(ctx: Context, step: Quantize) -> None:
    model = ctx.model
    head = model.lm_head
    assert isinstance(head, nn.Linear)
    bits_step = step if step.method != "smoothquant" and step.head_bits in (0, step.bits) else Quantize(bits=8)
    model.lm_head = _quantized(head, bits_step)
    if model.spec.tie_embeddings:
        assert isinstance(model.lm_head, Int8Linear | Int4Linear)
        model.embed = QuantEmbedding(model.lm_head)


def quantize(ctx: Context, step: Quantize) -> None:
    model = ctx.model
    if step.method == "rtn":
        for i in ctx.blocks("quantize rtn"):
            block = _block(model, i)
            for name in LINEARS:
                _set(block, name, _quantized(_linear(block, name), step))
    else:
        walker = ctx.walker(reference=step.method in ("gptq", "awq") and step.target == "model")
        for i in ctx.blocks(f"quantize {step.method}"):
            block = _block(model, i)
            if step.method == "gptq":
                # true-sequential: each layer sees the already-quantized ones before it; moves past the block
                for name, seen in walker.sequential(i):
                    layer = _linear(block, name)
                    weight = layer.weight.detach()
                    if seen.drift is not None:
                        weight = seen.drift_corrected(weight, step.damp)
                    _, packed = gptq.gptq(weight, seen.hessian_matrix(), step.bits, step.group_size,
                                          step.symmetric, step.damp,
                                          refit_rounds=step.refit, integer_zero=step.integer_zero)
                    bias = None if layer.bias is None else layer.bias.detach().float()
                    _set(block, name, Int8Linear(*packed, bias) if isinstance(packed, tuple) else
                         Int4Linear(packed, bias))
            elif step.method == "awq":
                first = LINEARS[0]
                aim = (first,) if step.target == "model" else ()
                stats = walker.collect(i, LINEARS, hessian=True, drift=aim)
                # The first layer's inputs are the block's own, which nothing in this block changes: it aims at
                # the uncompressed model's outputs, as GPTQ's target = "model" does. The later layers' stats
                # would go stale as the layers before them change; correcting them too made Δppl far worse,
                # where this alone lowered it (BENCHMARKS.md: AWQ).
                if aim:
                    layer = _linear(block, first)
                    layer.weight.data = stats[first].drift_corrected(layer.weight.detach().float(), step.damp).to(
                        layer.weight.dtype)
                awq.apply_to_block(block, stats, step.group_size, step.symmetric, integer_zero=step.integer_zero)
                for name in LINEARS:
                    _set(block, name, _quantized(_linear(block, name), step))
                walker.advance(i)
            else:  # smoothquant: W8A8
                stats = walker.collect(i, LINEARS)
                smoothquant.smooth_block(block, stats, step.alpha)
                for name in LINEARS:
                    _set(block, name, W8A8Linear.from_float(_linear(block, name)))
                walker.advance(i)
    if not step.keep_embeddings:
        _quantize_head(ctx, step)


# --- pruning ------------------------------------------------------------------------------------------


def prune(ctx: Context, step: Prune) -> None:
    model = ctx.model
    if step.method in ("heads", "channels", "layers"):
        _prune_structured(ctx, step)
        return
    needs_norms = step.method == "wanda" or (step.method == "2:4" and step.score == "wanda")
    walker = ctx.walker() if needs_norms else None
    for i in ctx.blocks(f"prune {step.method}"):
        block = _block(model, i)
        stats = walker.collect(i, LINEARS) if walker else {}
        for name in LINEARS:
            layer = _linear(block, name)
            w = layer.weight.detach().float()
            if step.method == "magnitude":
                mask = unstructured.magnitude_mask(w, step.sparsity)
            elif step.method == "wanda":
                mask = unstructured.wanda_mask(w, stats[name].norm, step.sparsity)
            else:
                score = w.abs() * (stats[name].norm.unsqueeze(0) if stats else 1)
                mask = unstructured.two_four_mask(score)
            unstructured.apply(layer, mask)
        if walker:
            walker.advance(i)
    layers = [_linear(_block(model, i), n) for i in range(len(model.layers)) for n in LINEARS]
    ctx.history.setdefault("sparsity", []).append(round(unstructured.sparsity_of(layers), 4))


def _prune_structured(ctx: Context, step: Prune) -> None:
    model = ctx.model
    spec = model.spec
    n = len(model.layers)
    # the counts are checked before the calibration passes, not after them
    if step.method == "layers":
        count = structured.layers_to_remove(n, step.sparsity)
    elif step.method == "heads":
        remove = structured.heads_to_remove(spec.num_heads, spec.num_kv_heads, step.sparsity)
    else:
        keep = structured.channels_to_keep(spec.intermediate_size, step.sparsity)
    walker = ctx.walker()
    if step.method == "layers":
        influence = []
        for i in ctx.blocks("layer influence"):
            before = walker.hidden
            walker.advance(i)
            influence.append(structured.block_influence(before, walker.hidden))
        drop = set(sorted(range(n), key=lambda i: influence[i])[:count])
        structured.remove_layers(model, drop)
        ctx.history["pruned_layers"] = sorted(drop)
        return
    dropped_heads = []
    for i in ctx.blocks(f"prune {step.method}"):
        block = _block(model, i)
        if step.method == "heads":
            stats = walker.collect(i, ("attn.o_proj",), hessian=True)["attn.o_proj"]
            importance = structured.head_importance(block, stats)
            walker.advance(i)
            dropped_heads.append(structured.prune_heads(block, importance, remove))
        else:
            stats = walker.collect(i, ("mlp.down_proj",))["mlp.down_proj"]
            importance = structured.channel_importance(block, stats)
            walker.advance(i)
            structured.prune_channels(block, importance, keep)
    # what went, as `layers` records its dropped layers: per layer the query heads (numbered as before),
    # or the MLP channels kept of how many
    if step.method == "heads":
        ctx.history["pruned_heads"] = dropped_heads
    else:
        ctx.history["pruned_channels"] = {"kept": keep, "of": spec.intermediate_size}
    structured.update_spec(model)


# --- low rank and distillation ------------------------------------------------------------------------


def factorise(ctx: Context, step: LowRank) -> None:
    teacher = copy.deepcopy(ctx.model) if step.recover_steps else None
    ranks = lowrank.apply(ctx.model, step.targets, step.rank, step.energy)
    if not ranks:
        raise InvalidParameterError("lowrank: no layer gets smaller at that rank or energy; lower it")
    ctx.history["lowrank_ranks"] = ranks
    if teacher is not None:  # windows no longer than the model reads (a short-context model's positions end)
        cfg = Distill(steps=step.recover_steps, seq_len=min(Distill.seq_len, ctx.model.spec.max_position))
        _train(ctx, teacher, ctx.model, cfg, "lowrank_recovery")


def _stream(ctx: Context, seq_len: int) -> torch.Tensor:
    if ctx.text is None:
        ctx.text, path, sha = calibration.stream(ctx.recipe.calibration, ctx.loaded.tokenizer, ctx.data_dir)
        ctx.history.setdefault("distill_data", {"file": str(path), "sha256": sha})
    tokens = ctx.text
    if tokens.numel() < seq_len + 2:  # distill.batches draws windows of seq_len + 1 (randrange failed on fewer)
        raise InvalidParameterError(
            f"calibration file {path} has {tokens.numel()} tokens, too few for one training window of seq_len "
            f"{seq_len} (+1); pass a longer text or a smaller seq_len (--seq-len)")
    return tokens


def _check_calibration_text(ctx: Context) -> None:
    """Tokenize the calibration text before the first step: a file too short for the samples or a training
    window was refused only when the step that reads it ran, after the steps before it (a distillation of
    minutes) had done their work, which was lost."""
    steps = ctx.recipe.steps
    _check_lengths(ctx.recipe, ctx.model.spec.max_position)
    if any(isinstance(s, Quantize | Prune) and reads_calibration(s) for s in steps):
        ctx.calib()
    windows = [s.seq_len for s in steps if isinstance(s, Distill)]
    windows += [min(Distill.seq_len, ctx.model.spec.max_position) for s in steps
                if isinstance(s, LowRank) and s.recover_steps]
    if windows:
        _stream(ctx, max(windows))


def _check_lengths(recipe: Recipe, context: int) -> None:
    """Calibration samples and training windows past the model's context ended in an IndexError from the
    rotary table, after the load."""
    if any(isinstance(s, Quantize | Prune) and reads_calibration(s) for s in recipe.steps) and (
            recipe.calibration.tokens > context):
        raise InvalidParameterError(
            f"calibration: tokens = {recipe.calibration.tokens} is longer than the model's context of {context} "
            f"tokens; set tokens to at most {context} in the recipe's [calibration]")
    for step in recipe.steps:
        if isinstance(step, Distill) and step.seq_len > context:
            raise InvalidParameterError(
                f"distill: seq_len = {step.seq_len} is longer than the model's context of {context} tokens; set "
                f"seq_len (--seq-len) to at most {context}")


def _train(ctx: Context, teacher: LlamaModel, student: LlamaModel, cfg: Distill, key: str,
           checkpoint: Path | None = None, resume: bool = False, every: int = 50,
           identity: dict[str, Any] | None = None) -> None:
    state = distill.train(teacher, student, _stream(ctx, cfg.seq_len), cfg, checkpoint=checkpoint, resume=resume,
                          every=every, progress=ctx.progress, identity=identity)
    ctx.history[key] = {"steps": state.step, "tokens": state.tokens, "seconds": round(state.seconds, 1),
                        "loss_curve": state.losses}


def distil(ctx: Context, step: Distill, layers: list[int] | None = None, checkpoint: Path | None = None,
           resume: bool = False, every: int = 50) -> None:
    teacher = ctx.model
    _check_lengths(Recipe((step,)), teacher.spec.max_position)  # `kiln distill` comes here first
    chosen = distill.student_layers(teacher.spec.num_layers, step.student_layers, layers)
    student = distill.make_student(teacher, chosen)
    # a checkpoint of another teacher or layer choice is not resumed
    _train(ctx, teacher, student, step, "distillation", checkpoint, resume, every,
           {"teacher": ctx.loaded.sha256, "teacher_layers": chosen})
    ctx.history["distillation"]["teacher_layers"] = chosen
    ctx.loaded.model = student


# --- the pipeline ---------------------------------------------------------------------------------------


def check_not_source(model: str, out: Path) -> None:
    """Refuse -o naming the artifact being compressed: writing replaced it, so the manifest's source named the
    new artifact itself and the model it was made from was gone."""
    source = resolve(model)
    if source.kind == "artifact" and out.resolve() == source.path:
        raise InvalidParameterError(f"output {out} is the artifact being compressed ({model}); writing would replace "
                                    "it, so pass another folder to -o")


def check_uncompressed(model: str) -> None:
    """Refuse an artifact whose layers are already quantized or factorised: every step reads full-precision
    matrices, so one ended in an AssertionError (quantize, prune), a failed backward pass (distill) or
    "no layer gets smaller" (lowrank) after the load. A pruned artifact's layers are plain and pass."""
    source = resolve(model)
    if source.kind != "artifact":
        return
    manifest = Manifest.read(source.path)
    formats = sorted({str(fmt.get("format")) for fmt in manifest.tensors.values()} & set(LAYER_KINDS))
    if formats:
        raise ModelFormatError(
            f"{model} is already compressed ({', '.join(formats)} layers), and kiln compresses full-precision "
            f"weights; pass the model it was made from ({manifest.source.get('name')}) with the whole recipe")


def config_depth(model: str) -> int | None:
    """The model's decoder layers from its config.json, read without loading any weights; None for a GGUF,
    whose config only exists once it is converted."""
    source = resolve(model)
    if source.kind == "gguf":
        return None
    return ModelSpec.from_hf_config(read_config(source.path)).num_layers


def check_student_layers(model: str, recipe: Recipe) -> None:
    """Refuse a distill step's student before the load, following the depth through the steps before it: one
    as deep as the model it learns from was refused only after the load and every earlier step had run."""
    depth = config_depth(model)
    if depth is None:  # distil() checks it against the loaded model
        return
    for step in recipe.steps:
        if isinstance(step, Distill):
            depth = len(distill.student_layers(depth, step.student_layers, None))
        elif isinstance(step, Prune) and step.method == "layers":
            depth -= structured.layers_to_remove(depth, step.sparsity)


def reads_calibration(step: Step) -> bool:
    """Whether a step runs calibration text through the model (the runners above: GPTQ, AWQ, SmoothQuant, Wanda
    scores, structured importance, distillation and low-rank recovery)."""
    if isinstance(step, Quantize):
        return step.method != "rtn"
    if isinstance(step, Prune):
        return step.method != "magnitude" and not (step.method == "2:4" and step.score == "magnitude")
    if isinstance(step, LowRank):
        return step.recover_steps > 0
    return True  # distillation


def check_calibration(recipe: Recipe, data_dir: Path | None) -> None:
    """A missing calibration file is refused before the load, not when the first step that reads it runs (after
    the steps before it had done their work)."""
    if any(reads_calibration(step) for step in recipe.steps):
        calibration.locate(recipe.calibration.file, data_dir)


def compress(model: str, recipe: Recipe, out: Path, data_dir: Path | None = None, progress: bool = True) -> Manifest:
    """Run `recipe` on `model` and write the artifact folder `out`; returns its manifest."""
    start = time.perf_counter()
    check_not_source(model, out)
    check_uncompressed(model)
    check_calibration(recipe, data_dir)
    check_student_layers(model, recipe)
    loaded = load(model, precision="fp32", progress=progress)
    ctx = Context(loaded, recipe, data_dir, progress)
    _check_calibration_text(ctx)
    runners = {"quantize": quantize, "prune": prune, "lowrank": factorise, "distill": distil}
    for step in recipe.steps:
        runners[kind_of(step)](ctx, step)  # type: ignore[operator]
    return _write(ctx, model, out, start)


def distill_to_artifact(teacher: str, cfg: Distill, out: Path, layers: list[int] | None = None,
                        data_dir: Path | None = None, resume: bool = False, every: int = 50,
                        progress: bool = True) -> Manifest:
    """`kiln distill`: train a student from the teacher's layers, checkpointing next to `out`."""
    start = time.perf_counter()
    if every < 1:  # 0 ended the first step in a ZeroDivisionError; a negative count was taken without a word
        raise InvalidParameterError(f"--checkpoint-every {every} must be at least 1 (training steps between "
                                    "checkpoints)")
    checkpoint = out.with_name(out.name + ".checkpoint")
    if resume and not distill.has_checkpoint(checkpoint):
        # refused before the teacher loads; --resume used to start afresh without a word
        raise InvalidParameterError(
            f"--resume: there is no checkpoint for {out} to resume (none in {checkpoint}); drop --resume to "
            "start afresh")
    if not resume and distill.has_checkpoint(checkpoint):
        # the first checkpoint of the new run replaced it: a forgotten --resume lost the interrupted run's training
        raise InvalidParameterError(
            f"{checkpoint} holds the checkpoint of an interrupted run of {out}; pass --resume to continue it, or "
            "delete that folder to start afresh")
    check_uncompressed(teacher)
    depth = config_depth(teacher)
    if depth is not None:  # the student's layers are checked again against the loaded teacher in distil()
        distill.student_layers(depth, cfg.student_layers, layers)
    check_calibration(Recipe((cfg,)), data_dir)
    ctx = Context(load(teacher, precision="fp32", progress=progress), Recipe((cfg,)), data_dir, progress)
    try:
        distil(ctx, cfg, layers, checkpoint, resume, every)
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(checkpoint, every)) from None
    manifest = _write(ctx, teacher, out, start)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return manifest


def _resume_hint(checkpoint: Path, every: int) -> str:
    """What an interrupted distillation can do next: resume from its last checkpoint, or start again."""
    try:
        step = json.loads((checkpoint / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return f"interrupted before the first checkpoint (one every {every} steps); rerun the command to start again"
    return (f"interrupted; the checkpoint at step {step} is in {checkpoint}: rerun the same command with --resume "
            "to continue from it")


def _write(ctx: Context, model: str, out: Path, start: float) -> Manifest:
    loaded = ctx.loaded
    ctx.history["seconds"] = round(time.perf_counter() - start, 1)
    source: dict[str, Any] = {"name": model, "sha256": loaded.sha256, "kind": loaded.source.kind}
    if loaded.source.kind == "artifact":  # a pruned artifact: without its steps the manifest told of the new ones only
        made = Manifest.read(loaded.source.path)
        source["made_from"] = {"source": made.source, "recipe": made.recipe, "calibration": made.calibration}
    manifest = Manifest(
        source=source,
        recipe=ctx.recipe.to_dict(),
        calibration=ctx.calibration.describe() if ctx.calibration else None,
        history=ctx.history,
    )
    io.save(ctx.model, loaded.folder, out, manifest)
    return Manifest.read(out)

