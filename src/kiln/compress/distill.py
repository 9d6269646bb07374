"""Knowledge distillation: a student (chosen teacher layers, or a smaller config) learns the teacher's logits.

loss = T^2 KL(softmax(teacher / T) || softmax(student / T)) + ce_weight * CE(student, next token)
(arXiv 1503.02531), AdamW with a linear warm-up and cosine decay, gradient clipping at 1. Checkpoints
(student, optimizer, step, loss curve and the losses not yet in it) are written atomically every N
steps; a run resumes from one. Hand-written because it is one of kiln's compression methods; torch
supplies autograd and AdamW.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kiln.compress.recipe import Distill
from kiln.errors import InvalidParameterError, ModelFormatError
from kiln.files import replace_folder
from kiln.model.llama import Block, LlamaModel

WARMUP = 0.05  # fraction of steps for the linear warm-up
CLIP = 1.0
EXTENSIBLE = ("steps", "time_budget_s")  # settings a resumed run may change: it can be made longer


def layer_choice(teacher_layers: int, student_layers: int) -> list[int]:
    """`student_layers` teacher layers, evenly spaced, always including the first and the last."""
    if student_layers >= teacher_layers:
        return list(range(teacher_layers))
    if student_layers == 1:
        return [teacher_layers - 1]
    return sorted({round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)})


def student_layers(teacher_layers: int, wanted: int | None, layers: list[int] | None) -> list[int]:
    """The teacher layers a student keeps: `layers` as given (checked), or `wanted` of them evenly spaced
    (half the teacher's by default)."""
    if layers is not None:
        valid = isinstance(layers, list) and bool(layers) and len(set(layers)) == len(layers) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < teacher_layers for i in layers)
        if not valid:
            raise InvalidParameterError(
                f"student layers {layers!r} are not allowed; list distinct teacher layer indices from 0 to "
                f"{teacher_layers - 1}, e.g. {{\"layers\": [0, {teacher_layers - 1}]}}")
        _check_smaller(teacher_layers, len(layers))
        return layers
    if wanted is not None and wanted > teacher_layers:
        raise InvalidParameterError(
            f"a student of {wanted} layers cannot be taken from a teacher of {teacher_layers}; pass --student-layers "
            f"(student_layers in a recipe) below {teacher_layers}")
    _check_smaller(teacher_layers, teacher_layers // 2 if wanted is None else wanted)
    return layer_choice(teacher_layers, wanted or teacher_layers // 2)


def _check_smaller(teacher_layers: int, count: int) -> None:
    """A student with every teacher layer was a full copy of the teacher, trained and written as if smaller;
    one with none (half of a one-layer teacher, by default) was an empty model that failed later."""
    if count < 1:
        raise InvalidParameterError(
            f"a teacher of {teacher_layers} layer has no smaller student (a student keeps at least one layer); "
            "distill from a deeper model")
    if count >= teacher_layers:
        raise InvalidParameterError(
            f"a student of {count} layers keeps all of the teacher's {teacher_layers} and is no smaller; pass "
            f"--student-layers (student_layers in a recipe) below {teacher_layers}, or a --student-config with "
            "fewer layers")


def make_student(teacher: LlamaModel, layers: list[int]) -> LlamaModel:
    """A copy of the teacher keeping only `layers` (embedding, final norm and head are copied too)."""
    spec = teacher.spec
    sliding = tuple(spec.sliding_layers[i] for i in layers) if spec.sliding_layers else ()
    student_spec = dataclasses.replace(spec, num_layers=len(layers), sliding_layers=sliding)
    with torch.device("meta"):
        student = LlamaModel(student_spec)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.")}
    for new, old in enumerate(layers):
        _take_replaced_layers(teacher.layers[old], student.layers[new])
        for k, v in teacher.layers[old].state_dict().items():
            state[f"layers.{new}.{k}"] = v
    # Row-major copies: the teacher keeps kiln's inference layout (each matrix the transpose of a contiguous
    # array, see llama.storage_layout), and in bf16 training the tied head's backward then multiplied
    # [32, 49152] by a transposed [49152, 576], which oneDNN's AMX kernel killed with SIGFPE; nn.Linear's
    # own layout is the one torch's training kernels are built and tested for.
    student.load_state_dict({k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()},
                            strict=False, assign=True)
    if spec.tie_embeddings:
        student.tie_weights()
    for i, block in enumerate(student.layers):
        assert isinstance(block, Block)
        block.attn.layer = i
    student._rope_table(teacher.dtype)
    return student


def _take_replaced_layers(source: nn.Module, target: nn.Module) -> None:
    """Give `target` (a fresh block) a copy of each layer an earlier step replaced in `source`, a factorised one
    (low rank): the fresh block's plain nn.Linear there ignored the factors, kept its meta weights and ended the
    first backward pass in a device-mismatch traceback. The copies' tensors are then assigned from the state."""
    for name, module in list(source.named_modules()):
        if name and type(module) is not type(target.get_submodule(name)):
            parent, _, attr = name.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, attr, copy.deepcopy(module))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
            ce_weight: float) -> tuple[Tensor, Tensor]:
    """(total loss, KL term) over all positions; logits [B, T, V], targets [B, T]."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  log_target=True, reduction="none").sum(-1).mean() * t * t
    if ce_weight == 0:
        return kl, kl
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    return kl + ce_weight * ce, kl


def lr_at(done: float, peak: float) -> float:
    """Learning rate after `done` (0..1) of the run: linear warm-up, then cosine decay to zero."""
    if done < WARMUP:
        return peak * max(done, 0.01 * WARMUP) / WARMUP
    progress = (done - WARMUP) / (1 - WARMUP)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_fraction(state: TrainState, cfg: Distill) -> float:
    """How far the run is, by steps or by the time budget, whichever ends it first."""
    done = state.step / cfg.steps
    if cfg.time_budget_s:
        done = max(done, state.seconds / cfg.time_budget_s)
    return min(done, 1.0)


def batches(tokens: Tensor, batch_size: int, seq_len: int, seed: int, skip: int = 0) -> Iterator[Tensor]:
    """Endless random windows of seq_len + 1 tokens from one long token stream, after the first `skip` batches.

    A resumed run skips the batches of the steps already done, so it trains on the same windows as an
    uninterrupted run (reseeding at the resumed step gave other windows, and other final weights).
    """
    rng = random.Random(seed)
    for _ in range(skip * batch_size):
        rng.randrange(0, tokens.numel() - seq_len - 1)
    while True:
        starts = [rng.randrange(0, tokens.numel() - seq_len - 1) for _ in range(batch_size)]
        yield torch.stack([tokens[s : s + seq_len + 1] for s in starts])


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    tokens: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last point)
    # the steps since the last point, checkpointed with it: resumed, the next point averages the same steps
    # as an uninterrupted run's (it averaged the resumed ones only), and a run checkpointed at its last step
    # still ends with its final point
    loss_sum: float = 0.0
    num_loss_steps: int = 0


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint (state.json is written with the rest, in one atomic replace)."""
    return (folder / "state.json").is_file()


def save_checkpoint(folder: Path, student: LlamaModel, optimizer: torch.optim.Optimizer, state: TrainState,
                    identity: dict[str, Any] | None = None) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict()}, tmp / "weights.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__))
        (tmp / "spec.json").write_text(json.dumps(student.spec.to_hf_config()))
        (tmp / "run.json").write_text(json.dumps(identity or {}))
        replace_folder(tmp, folder)
    except BaseException:
        # a Ctrl-C or a full disk mid-write left the half-written copy (hundreds of MB) beside the output for good
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(folder: Path, student: LlamaModel, optimizer: torch.optim.Optimizer,
                    identity: dict[str, Any] | None = None) -> TrainState:
    """The state of the checkpointed run, into `student` and `optimizer`; refused if `identity` differs.

    Another student shape ended in load_state_dict's traceback; another teacher, layer choice or setting
    would have continued silently from weights the command did not ask for."""
    saved, weights, raw = _read_checkpoint(folder)
    wanted = json.loads(json.dumps(identity or {}))  # as JSON stores it: tuples are lists
    if saved != wanted:
        raise InvalidParameterError(
            f"the checkpoint {folder} is of another distillation ({'; '.join(_differences(saved, wanted))}); pass "
            "the settings it was started with, or drop --resume to start afresh"
        )
    try:
        student.load_state_dict(weights["student"])
        optimizer.load_state_dict(weights["optimizer"])
        state = TrainState(**{**raw, "losses": [tuple(x) for x in raw["losses"]]})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise _unreadable(folder, exc) from exc
    return state


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run and this command's, a setting with both values: "settings differ"
    alone left the user to guess which of ten flags to change back."""
    out = []
    for key in sorted(saved.keys() | wanted.keys()):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "settings" and isinstance(old, dict) and isinstance(new, dict):
            out += [f"{name} {old.get(name)!r} in the checkpoint, {new.get(name)!r} now"
                    for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
        elif key == "teacher_layers":
            out.append(f"teacher layers {old} in the checkpoint, {new} now")
        else:
            out.append(f"{key} differs")
    return out


def _read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The run identity, weights and state a checkpoint holds. A truncated or damaged file (a full disk, a copy
    cut short) ended the resume in torch's or json's traceback once the teacher had loaded."""
    try:
        run = folder / "run.json"
        saved = json.loads(run.read_text()) if run.is_file() else {}
        weights = torch.load(folder / "weights.pt", weights_only=True)  # kiln's own file: tensors, plain types
        raw = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise _unreadable(folder, exc) from exc
    if not all(isinstance(x, dict) for x in (saved, weights, raw)):
        raise _unreadable(folder, ValueError("unexpected contents"))
    return saved, weights, raw


def _unreadable(folder: Path, exc: BaseException) -> ModelFormatError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ModelFormatError(f"the checkpoint {folder} is damaged ({reason}); delete it and drop --resume to start "
                            "afresh")


def train(teacher: LlamaModel, student: LlamaModel, tokens: Tensor, cfg: Distill, checkpoint: Path | None = None,
          resume: bool = False, every: int = 50, log_every: int = 10, progress: bool = True,
          on_step: Callable[[TrainState], None] | None = None, identity: dict[str, Any] | None = None) -> TrainState:
    """Train `student` in place on windows of `tokens`; stops at cfg.steps or cfg.time_budget_s.

    identity: what else defines the run (the teacher, its layers); with the student's shape and the settings
    it is stored in each checkpoint, and a resume from a checkpoint of another run is refused."""
    for p in student.parameters():
        p.requires_grad_(True)
    teacher.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state = TrainState()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXTENSIBLE}
    identity = {"student": student.spec.to_hf_config(), "settings": settings, **(identity or {})}
    if resume:
        if checkpoint is None or not has_checkpoint(checkpoint):
            raise InvalidParameterError(
                f"--resume: there is no checkpoint in {checkpoint} to resume; drop --resume to start afresh")
        state = load_checkpoint(checkpoint, student, optimizer, identity)
        if state.step > cfg.steps:  # the student was written with more steps than its manifest's recipe says
            raise InvalidParameterError(
                f"--resume: the checkpoint in {checkpoint} is at step {state.step}, past --steps {cfg.steps}; pass "
                f"--steps {state.step} (the student as it is) or more")
    stream = batches(tokens, cfg.batch_size, cfg.seq_len, seed=0, skip=state.step)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="distill", unit="step", disable=None if progress else True)
    start = time.perf_counter() - state.seconds
    try:
        while state.step < cfg.steps and (cfg.time_budget_s is None or state.seconds < cfg.time_budget_s):
            batch = next(stream)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            # bf16 autocast roughly doubles training speed on CPUs with bf16 matmul units; the loss, the
            # master weights and AdamW's moments stay fp32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                with torch.no_grad():
                    teacher_logits = teacher(inputs, logits="all")
                student.train()
                student_logits = student(inputs, logits="all")
            loss, _ = kd_loss(student_logits.float(), teacher_logits.float(), targets, cfg.temperature,
                              cfg.ce_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(run_fraction(state, cfg), cfg.lr)
            optimizer.step()
            state.step += 1
            state.tokens += inputs.numel()
            state.seconds = time.perf_counter() - start
            value = loss.item()
            state.loss_sum, state.num_loss_steps = state.loss_sum + value, state.num_loss_steps + 1
            if state.step % log_every == 0:
                _log_point(state)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}")
            if checkpoint is not None and state.step % every == 0:
                save_checkpoint(checkpoint, student, optimizer, state, identity)
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    if state.num_loss_steps:
        _log_point(state)
    return state


def _log_point(state: TrainState) -> None:
    """Close the loss curve's point at state.step: the mean loss of the steps since the previous one."""
    state.losses.append((state.step, state.loss_sum / state.num_loss_steps))
    state.loss_sum, state.num_loss_steps = 0.0, 0


def validation_loss(model: LlamaModel, tokens: Tensor, seq_len: int = 256, windows: int = 16) -> float:
    """Mean next-token cross-entropy over the first `windows` windows of `tokens` (for reporting)."""
    with torch.inference_mode():
        losses = []
        for i in range(windows):
            chunk = tokens[i * seq_len : (i + 1) * seq_len + 1]
            if chunk.numel() < seq_len + 1:
                break
            logits = model(chunk[:-1].unsqueeze(0), logits="all")[0]
            losses.append(float(F.cross_entropy(logits.float(), chunk[1:])))
    return sum(losses) / len(losses)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
