"""`kiln export --format onnx`: a model or artifact as an ONNX Runtime model with explicit KV inputs/outputs.

The graph is written by ONNX Runtime GenAI's model builder (the same one ORT GenAI ships), not by hand:
it emits the fused operators ONNX Runtime is fast with (GroupQueryAttention with rotary embedding,
SkipSimplifiedLayerNormalization, MatMulNBits for int4 / int8 weight-only matrices). kiln hands it the
model's weights as a dense Hugging Face folder (a pruned, low-rank or distilled artifact is just a smaller
or different dense model) and asks for MatMulNBits at the artifact's bits and group size. The builder's
own RTN would quantize a second time (on this model that alone costs a mean KL of about 0.27), so kiln
then writes its artifact's exact integers into each MatMulNBits node: int4 codes with their scales
(symmetric groups need no zero point and take ORT's fast int4 kernels, which round activations to int8),
int8 rows as 8-bit blocks with the row's scale. Asymmetric groups with integer zero points (offset
-z * s, z in 0..15: `zero_point = "integer"`) give MatMulNBits their z, which the same fast kernels take.
Asymmetric groups with a float offset, such as Q4_1's, have no fast form in MatMulNBits (float zero
points run on its fp32 kernels), so they are split:
q * s + offset = (q - 8) * s + (offset + 8 s), the first term on the fast symmetric kernel and the
second, one number per group, as a small fp32 MatMul of the input's group sums, added after (the
default model's int4 g32 asymmetric artifact, batch-1 decode: 5.7 tok/s with float zero points, 66.7
split; BENCHMARKS.md). lm_head stays fp32 unless the artifact quantized it (then it gets the artifact's integers
too); the embedding lookup stays fp32, which costs memory but no bandwidth per token. The export is
then checked against the source: logits at the positions of real prompts, on the graph that decodes and
on the prefill graph, must agree within the declared tolerance, else the export is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from kiln.artifact.io import TOKENIZER_FILES
from kiln.artifact.manifest import Manifest, is_artifact
from kiln.errors import InvalidParameterError, KilnError
from kiln.files import check_replaceable, replace_folder
from kiln.model.llama import Block, LlamaModel, weight_map
from kiln.model.load import LoadedModel
from kiln.model.source import ONNX_EXPORT_MARKER, file_digest, remember_sha256, sha256_file
from kiln.model.spec import ModelSpec, int8_block  # also onnx_export.int8_block for the export's callers

OnnxPrecision = Literal["auto", "fp32", "int8", "int4"]
ONNX_FILE = "model.onnx"
# 2: the logits_to_keep input; 3: int8 artifacts in larger blocks; 4: tied int4 heads shared with the
# embedding lookup; 5: asymmetric int4 as symmetric kernels plus group-offset terms; 6: int4 exports
# carry a prefill graph; 7: integer zero points on MatMulNBits, group sums by ReduceSum; 8: the prefill
# graph's int4 layers widened to 8-bit blocks in a data file of their own (runtimes cache exports by version)
EXPORT_VERSION = 8
# logit_error's bound per precision (|logit difference| / logit range at the median position of real
# prompts): fp32 is the same arithmetic in another order; int4 / int8 add MatMulNBits' int8 activation
# rounding (accuracy level 4)
TOLERANCE = {"fp32": 1e-3, "int8": 0.05, "int4": 0.08}


class OnnxExportError(KilnError):
    """The builder failed, or the exported graph does not reproduce the source within tolerance."""


@dataclass(frozen=True)
class BuildPlan:
    precision: Literal["fp32", "int8", "int4"]
    block_size: int = 32
    symmetric: bool = True
    quantize_head: bool = False
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast, like llama.cpp), 1 = fp32 activations
    tied: bool = False  # the model's embedding is its lm_head's matrix
    head_bits: int = 0  # 8: an int4 plan whose lm_head is int8 (the builder makes it 4-bit; transplant widens it)
    zero_points: bool = False  # an asymmetric int4 artifact whose offsets are integer zero points (-z x scale)

    @property
    def shared_embedding(self) -> bool:
        """The embedding lookup reads lm_head's blocks (GatherBlockQuantized) instead of an fp32 copy.

        That is what kiln's own model does with a quantized tied head, and it drops the fp32 table
        (113 MB of the default model's 195 MB int4 export, and as much resident memory). An int4 head
        is shared when its groups are symmetric or carry integer zero points (GatherBlockQuantized takes the
        head's packed zero points, as MatMulNBits does; float offsets it cannot express); an int8 head (one
        scale per row, no offsets) always is. transplant rewires the lookup to the head's own tensors."""
        return self.precision == "int4" and self.quantize_head and self.tied and (
            self.symmetric or self.zero_points or self.head_bits == 8)

    def builder_args(self) -> list[str]:
        if self.precision == "fp32":
            return ["-p", "fp32"]
        extra = [f"block_size={self.block_size}", f"is_symmetric={str(self.symmetric).lower()}",
                 f"accuracy_level={self.accuracy_level}"]
        # otherwise the embedding lookup stays fp32 (it costs no bandwidth per token); lm_head follows the artifact
        excluded = [] if self.shared_embedding else ["/model/embed_tokens/Gather"]
        excluded += [] if self.quantize_head else ["/lm_head/MatMul"]
        if excluded:
            extra.append(f"nodes_to_exclude={','.join(excluded)}")
        if self.shared_embedding:
            extra.append("shared_embeddings=true")
        return ["-p", self.precision, "--extra_options", *extra]


def plan_for(loaded: LoadedModel, precision: OnnxPrecision) -> BuildPlan:
    """The builder settings that match the artifact (or the precision asked for)."""
    return plan_for_folder(loaded.folder, loaded.spec, precision)


def quantize_step(folder: Path) -> dict[str, Any]:
    """The artifact's last quantize step as its manifest records it; {} for anything else."""
    if not is_artifact(folder):
        return {}
    quant = [s for s in Manifest.read(folder).recipe.get("steps", []) if s.get("kind") == "quantize"]
    return quant[-1] if quant else {}


def float_offsets(step: dict[str, Any]) -> bool:
    """Whether a quantize step's int4 groups carry float offsets (Q4_1's grid: the group minimum), which the
    export splits off each MatMulNBits; integer zero points and symmetric groups run on MatMulNBits alone."""
    return (step.get("bits") == 4 and not step.get("symmetric", False)
            and step.get("zero_point", "float") == "float")


def plan_for_folder(folder: Path, spec: ModelSpec, precision: OnnxPrecision) -> BuildPlan:
    """plan_for from the files alone, for `kiln plan`, which prices an artifact's export without loading it."""
    step = quantize_step(folder)
    head = not step.get("keep_embeddings", True)
    tied = spec.tie_embeddings
    head8 = 8 if head and step.get("bits") == 4 and step.get("head_bits") == 8 else 0  # int8 head, int4 layers
    zero_points = step.get("bits") == 4 and not step.get("symmetric", False) and step.get("zero_point") == "integer"
    if precision == "auto":
        if step.get("bits") == 4:
            return BuildPlan("int4", int(step.get("group_size", 128)), bool(step.get("symmetric", False)), head,
                             tied=tied, head_bits=head8, zero_points=zero_points)
        return BuildPlan("int8", int8_block(spec), True, head) if step.get("bits") == 8 else BuildPlan("fp32")
    if precision == "int4":
        return BuildPlan("int4", int(step.get("group_size", 32)), bool(step.get("symmetric", False)), head, tied=tied,
                         head_bits=head8, zero_points=zero_points)
    return BuildPlan(precision, 32, True, head) if precision == "int8" else BuildPlan("fp32")


def head_bits(plan: BuildPlan) -> int:
    """The bits of the export's lm_head: 0 when it stays fp32."""
    if not plan.quantize_head or plan.precision == "fp32":
        return 0
    return plan.head_bits or (8 if plan.precision == "int8" else 4)


# --- dense Hugging Face folder ---------------------------------------------------------------------


def _dense(model: LlamaModel, name: str) -> Tensor:
    """A graph parameter as a dense fp32 tensor, dequantizing packed or factorized layers."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if module_name == "embed" and not isinstance(module, nn.Embedding):
        module = model.lm_head  # a quantized tied embedding is the quantized head
    dequantized = getattr(module, "dequantized", None)
    if attr == "weight" and callable(dequantized):
        return dequantized().float()
    return getattr(module, attr).detach().float()


def dense_state(model: LlamaModel) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names, fused projections split again."""
    spec = model.spec
    sizes = {3: [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2,
             2: [spec.intermediate_size] * 2}
    state: dict[str, Tensor] = {}
    for name, sources in weight_map(spec):
        tensor = _dense(model, name)
        parts = [tensor] if len(sources) == 1 else list(torch.split(tensor, sizes[len(sources)], dim=0))
        for source, part in zip(sources, parts, strict=True):
            state[source] = part.contiguous()
    return state


def write_hf_folder(loaded: LoadedModel, out: Path) -> Path:
    """`loaded` as a dense fp32 Hugging Face folder (config, safetensors, tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(dense_state(loaded.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = loaded.spec.to_hf_config()
    config.setdefault("torch_dtype", "float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (loaded.folder / name).exists():
            shutil.copy(loaded.folder / name, out / name)
    return out


# --- export ----------------------------------------------------------------------------------------


def check_output(out: Path) -> None:
    """Refuse an output `export` would have to destroy (it replaces its folder whole). Run before any work."""
    check_replaceable(out, ONNX_EXPORT_MARKER, "ONNX export")


def export(loaded: LoadedModel, out: Path, precision: OnnxPrecision = "auto", check: bool = True,
           plan: BuildPlan | None = None, progress: bool = True) -> Path:
    """Build the ONNX model folder `out` (model.onnx and kiln.onnx + weights + genai_config.json + tokenizer);
    `plan` overrides the builder settings that `plan_for` would derive from the artifact."""
    try:
        import onnxruntime_genai  # noqa: F401  (the builder lives in this package)
    except ImportError as exc:
        raise InvalidParameterError(
            "ONNX export needs onnxruntime-genai and onnx-ir; install them with `pip install 'lmkiln[onnx]'`"
        ) from exc
    if loaded.spec.head_dim % 16:
        raise InvalidParameterError(
            f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16; this model's is "
            f"{loaded.spec.head_dim}; use the torch runtime"
        )
    refuse_unexportable(loaded)
    plan = plan or plan_for(loaded, precision)
    stages = ["build", *(["transplant"] if plan.precision != "fp32" else []), *(["check"] if check else []), "write"]
    # the builder alone takes half a minute on the default model: a bar says the export is under way
    bar = tqdm(total=len(stages), desc="export onnx", unit="stage", disable=None if progress else True)

    def begin(stage: str) -> None:
        bar.set_postfix_str(stage)

    with bar, tempfile.TemporaryDirectory(prefix="kiln-onnx-") as scratch:
        begin("build")
        folder = write_hf_folder(loaded, Path(scratch) / "hf")
        staging = Path(scratch) / "onnx"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(staging),
               "-e", "cpu", "-c", str(Path(scratch) / "cache"), *plan.builder_args()]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not (staging / ONNX_FILE).is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise OnnxExportError(f"ONNX Runtime GenAI's model builder failed: {last[0]}")
        bar.update(1)
        if plan.precision != "fp32":
            begin("transplant")
            transplant(staging, loaded.model)
            bar.update(1)
        keep_last_logits(staging)
        write_prefill_graph(staging)
        files = file_records(staging)
        (staging / ONNX_EXPORT_MARKER).write_text(json.dumps({
            "source": loaded.source.name, "source_sha256": loaded.sha256, "precision": plan.precision,
            "block_size": plan.block_size, "symmetric": plan.symmetric, "quantized_head": plan.quantize_head,
            "head_bits": head_bits(plan), RUNTIME_KEY: runtime_versions(), FILES_KEY: files}))
        # onnx writes the weights file private (0600) where every other file gets the umask's mode: another
        # user's process could then not read a shared cache's export
        mode = (staging / ONNX_EXPORT_MARKER).stat().st_mode & 0o777
        for path in staging.iterdir():
            if path.is_file():
                path.chmod(mode)
        if check:
            begin("check")
            error = logit_error(loaded, staging)
            if error > TOLERANCE[plan.precision]:
                raise OnnxExportError(
                    f"the ONNX export's logits differ from the source by {error:.4f} of their range at the "
                    f"median position (tolerance {TOLERANCE[plan.precision]}); it was not written"
                )
            bar.update(1)
        begin("write")
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.move(str(staging), partial)  # beside `out` (the scratch folder may be on another file system)
            replace_folder(partial, out)
            for name, record in files.items():  # so the runtime's check of the new export reads nothing again
                remember_sha256(out / name, record["sha256"])
        except OSError as exc:  # a read-only place or a full disk: one line, not a traceback after the work
            raise InvalidParameterError(f"cannot write the ONNX export {out} ({exc}); pass a writable folder "
                                        "with room for it") from exc
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        bar.update(1)
    return out


FILES_KEY = "files"  # the marker's record of every file of the export: {name: {"bytes": n, "sha256": hex}}
RUNTIME_KEY = "runtime"  # the marker's versions of the packages that built the export and will run it


def runtime_versions() -> dict[str, str]:
    """The versions of ONNX Runtime and of its GenAI builder installed here, as the marker records them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnxruntime", "onnxruntime-genai"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "none"
    return found


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Each file of the export in `folder` (but the marker) with its size and sha256."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)}
            for f in sorted(folder.iterdir()) if f.is_file() and f.name != ONNX_EXPORT_MARKER}


def export_problem(folder: Path) -> str | None:
    """Why `folder` is not an export as `export` wrote it, or None when it was built with the ONNX Runtime
    installed here and every file its marker lists is there with that size and sha256.

    ONNX Runtime loads whatever the files hold: a truncated weights file stopped it with a traceback,
    and bytes changed in place ran silently. The hashes are remembered per (path, size, mtime), so an
    unchanged export costs a stat per file; one changed since is read whole once."""
    try:
        marker = json.loads((folder / ONNX_EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return f"it has no readable {ONNX_EXPORT_MARKER}"
    files = marker.get(FILES_KEY) if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        return f"its {ONNX_EXPORT_MARKER} lists no files (an earlier kiln wrote it)"
    # a graph the builder wrote for one ONNX Runtime need not load in another: after an upgrade or a downgrade
    # the cached export stopped the load with ONNX Runtime's own traceback
    built, installed = marker.get(RUNTIME_KEY), runtime_versions()
    if built != installed:
        were = ", ".join(f"{k} {v}" for k, v in built.items()) if isinstance(built, dict) else "unrecorded versions"
        now = ", ".join(f"{k} {v}" for k, v in installed.items())
        return f"it was built with {were}, and this is {now}"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if not isinstance(record, dict) or size != record.get("bytes"):
            return f"{name} holds {size} bytes, not what it was written with"
        if sha256_file(path) != record.get("sha256"):
            return f"{name} has changed since it was written"
    return None


def refuse_unexportable(loaded: LoadedModel) -> None:
    """Refuse, before the build, layers the export has no form for.

    W8A8 layers round their activations to int8 per token at run time; MatMulNBits rounds them in
    blocks, and the builder quantized their dequantized weights again with its own RTN, so the export
    ran other arithmetic and failed its logit check after the whole build (or passed it by chance)."""
    from kiln.compress.quantize.qlinear import W8A8Linear

    if any(isinstance(m, W8A8Linear) for m in loaded.model.modules()):
        raise InvalidParameterError(
            "the ONNX export has no form for W8A8 layers (int8 activations quantized per token); run them with "
            "--runtime torch, or export the model they were compressed from or a --quantize int8 or int4 artifact"
        )


def _module_rows(model: LlamaModel, weight_name: str) -> tuple[nn.Module, slice] | None:
    """The kiln layer (and its rows) behind a builder weight such as model.layers.3.mlp.up_proj.MatMul.weight_Q4."""
    if re.fullmatch(r"lm_head\.MatMul\.weight_Q\d", weight_name):
        return model.lm_head, slice(None)
    match = re.fullmatch(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight_Q\d", weight_name)
    if match is None:
        return None
    block, proj = model.layers[int(match.group(1))], match.group(3)
    assert isinstance(block, Block)
    inter = model.spec.intermediate_size
    table: dict[str, tuple[nn.Module, slice]] = {
        "qkv_proj": (block.attn.qkv_proj, slice(None)), "o_proj": (block.attn.o_proj, slice(None)),
        "gate_proj": (block.mlp.gate_up_proj, slice(0, inter)), "up_proj": (block.mlp.gate_up_proj, slice(inter, None)),
        "down_proj": (block.mlp.down_proj, slice(None)),
    }
    return table.get(proj)


def transplant(folder: Path, model: LlamaModel) -> int:
    """Overwrite the builder's MatMulNBits weights with the artifact's own integers; returns how many."""
    import onnx
    from onnx import numpy_helper

    from kiln.compress.quantize import grid
    from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear

    path = folder / ONNX_FILE
    graph_model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in graph_model.graph.initializer}
    done = 0
    group_sums: dict[str, str] = {}  # a MatMulNBits input -> its group sums, shared by the nodes that read it
    added: list[tuple[int, list[Any]]] = []  # (index of a node, the nodes to insert after it)

    def put(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for node in graph_model.graph.node:
        found = _module_rows(model, node.input[1]) if node.op_type == "MatMulNBits" else None
        if found is None:
            continue
        module, rows = found
        bits = next(a.i for a in node.attribute if a.name == "bits")
        block = next(a.i for a in node.attribute if a.name == "block_size")
        n, blocks = inits[node.input[2]].dims[0], inits[node.input[2]].dims[1]
        if isinstance(module, Int4Linear) and bits == 4 and module.group_size == block:
            codes = grid.unpack_int4(module.qweight)[rows]
            scales = module.scales[rows]
            put(node.input[1], grid.pack_int4(codes).reshape(n, blocks, block // 2).numpy())
            put(node.input[2], scales.numpy().astype(np.float32))
            del node.input[3:]  # no zero point: MatMulNBits takes 8, (q - 8) * scale, on its fast kernels
            zeros = integer_zero_points(module.offsets[rows], scales)
            if zeros is not None and bool((zeros != 8).any()):  # offsets -z * s: the same fast kernels take z
                node.input.append(f"{node.input[1]}_kiln_zero_points")
                graph_model.graph.initializer.append(numpy_helper.from_array(pack_zero_points(zeros), node.input[3]))
            elif zeros is None:  # float offsets (Q4_1's group minimum): split them off
                extra = module.offsets[rows] + 8 * scales  # [n, blocks]: what each group adds to (q - 8) * s
                added.append(_group_offsets(graph_model.graph, node, extra, block, group_sums))
            if node.name.startswith("/lm_head/") and zeros is not None:  # a lookup that shares the head reads it
                _point_lookup_at_head(graph_model.graph, node, 4, block, inits)
            done += 1
        elif isinstance(module, Int8Linear):
            if bits != 8:  # an int8 head in an int4 graph: the builder made it 4-bit like the layers
                block = int8_block(model.spec)
                blocks = node_k(node) // block
                _set_attributes(node, bits=8, block_size=block)
                del node.input[3:]  # an asymmetric plan's zero points; 8-bit codes are offset by 128 instead
                _point_lookup_at_head(graph_model.graph, node, 8, block, inits)
            codes8 = (module.qweight[rows].to(torch.int16) + 128).to(torch.uint8)  # MatMulNBits 8-bit is unsigned
            put(node.input[1], codes8.reshape(n, blocks, block).numpy())
            put(node.input[2], module.scales[rows].unsqueeze(1).expand(n, blocks).contiguous().numpy())
            done += 1  # no zero-point input: 8-bit MatMulNBits then uses 128
    for index, nodes in sorted(added, key=lambda a: -a[0]):  # from the end, so earlier indices hold
        for offset, extra_node in enumerate(nodes):
            graph_model.graph.node.insert(index + 1 + offset, extra_node)
    used = {i for node in graph_model.graph.node for i in node.input}
    keep = [t for t in graph_model.graph.initializer if t.name in used]
    del graph_model.graph.initializer[:]
    graph_model.graph.initializer.extend(keep)
    (folder / (ONNX_FILE + ".data")).unlink(missing_ok=True)
    onnx.save_model(graph_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_FILE + ".data")
    return done


def _point_lookup_at_head(graph: Any, head: Any, bits: int, block: int, inits: dict[str, Any]) -> None:
    """Point the tied embedding lookup (GatherBlockQuantized, when the plan shares the head) at the head's
    codes, scales and zero points as transplant left them.

    The builder feeds the lookup the head's codes reshaped to [N, K / 2] as 4-bit data, but with an
    asymmetric plan it feeds it the dense weight with no scales, and an int8 head is 4-bit to the builder.
    The lookup is rewired here to Reshape(codes -> [N, padded K x bits / 8]), the head's scales and its
    zero points where it has them (packed as MatMulNBits packs them; GatherBlockQuantized reads the same
    layout), so it dequantizes what the head multiplies with.
    """
    from onnx import numpy_helper

    weight, scales, zero_points = head.input[1], head.input[2], list(head.input[3:4])
    n = next(a.i for a in head.attribute if a.name == "N")
    width = -(-node_k(head) // block) * block * bits // 8  # the blocks' bytes per row, the last one padded
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized" or not node.name.startswith("/model/embed_tokens/"):
            continue
        reshape = next(r for r in graph.node if r.output[0] == node.input[0])
        assert reshape.op_type == "Reshape"
        shape = f"{weight}/kiln_rows"
        if shape not in inits:
            inits[shape] = numpy_helper.from_array(np.array([n, width], dtype=np.int64), shape)
            graph.initializer.append(inits[shape])
        old_shape = reshape.input[1]
        reshape.input[:] = [weight, shape]
        node.input[:] = [reshape.output[0], node.input[1], scales, *zero_points]
        _set_attributes(node, bits=bits, block_size=block)
        # the builder's shapes for the lookup's data and rows (its padded width for groups that do not
        # divide K), and the Constant that made the first, no longer hold: ONNX Runtime infers them again
        stale = [v for v in graph.value_info if v.name in (reshape.output[0], node.output[0])]
        for v in stale:
            graph.value_info.remove(v)
        if not any(old_shape in other.input for other in graph.node):
            for constant in [c for c in graph.node if c.op_type == "Constant" and old_shape in c.output]:
                graph.node.remove(constant)


def node_k(node: Any) -> int:
    """A MatMulNBits node's input size."""
    return int(next(a.i for a in node.attribute if a.name == "K"))


def _set_attributes(node: Any, **values: int) -> None:
    for attribute in node.attribute:
        if attribute.name in values:
            attribute.i = values[attribute.name]


def integer_zero_points(offsets: Tensor, scales: Tensor) -> Tensor | None:
    """The groups' zero points z (uint8, 0..15) where every offset is -z x scale, else None.

    An artifact quantized with integer zero points (`zero_point = "integer"`, as GPTQ and AWQ checkpoints
    are) stores them as offsets -z * s in fp32, from which -offset / s rounds back to z; a symmetric one
    has z = 8 throughout. Float offsets (the group minimum, Q4_1's grid) land between the integers.
    """
    z = -offsets.double() / scales.double()
    rounded = z.round()
    if bool((z - rounded).abs().max() > 1e-3) or bool(rounded.min() < 0) or bool(rounded.max() > 15):
        return None
    return rounded.to(torch.uint8)


def pack_zero_points(zeros: Tensor) -> np.ndarray:
    """MatMulNBits' 4-bit zero points: [N, ceil(blocks / 2)] bytes, a row's first block in the low nibble."""
    from kiln.compress.quantize import grid

    padded = torch.nn.functional.pad(zeros, (0, zeros.shape[1] % 2), value=8)
    return grid.pack_int4(padded).numpy()


def group_offset_nodes(x: str, main: str, out: str, name: str, k: int, block: int, groups: int,
                       sums: str | None = None) -> tuple[list[Any], dict[str, np.ndarray]]:
    """The nodes that add x's group sums times the [groups, N] initializer f"{name}/kiln_offsets" to
    `main` (a symmetric MatMulNBits' output) as `out`, and the small initializers they need.

    The group sums of x come from `sums` when another node already computed them for the same input (q/k/v;
    gate and up), else from here: a Reshape to [..., groups, block] and a ReduceSum, where block divides K;
    else a MatMul with a 0/1 matrix [K, groups] that stops the last, shorter group at the real inputs. A
    0/1 matrix is as many bytes as the offsets themselves, which every decode step would read: on the
    default model's int4 g32 artifact the ReduceSum form decodes about 3% faster (BENCHMARKS.md).
    Also the timing graph `kiln plan --calibrate` prices this form with (plan/onnx_profile.py).
    """
    from onnx import helper

    nodes, inits = [], {}
    if sums is None:
        sums = f"{name}/kiln_group_sums"
        if k % block == 0:
            shape, axes = f"{name}/kiln_group_shape", f"{name}/kiln_group_axes"
            inits[shape], inits[axes] = np.array([0, 0, groups, block], np.int64), np.array([-1], np.int64)
            nodes += [helper.make_node("Reshape", [x, shape], [f"{sums}/groups"], name=f"{sums}/groups"),
                      helper.make_node("ReduceSum", [f"{sums}/groups", axes], [sums], name=sums, keepdims=0)]
        else:
            ones = f"{name}/kiln_group_ones"
            inits[ones] = (np.arange(k)[:, None] // block == np.arange(groups)[None, :]).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [x, ones], [sums], name=sums))
    nodes += [helper.make_node("MatMul", [sums, f"{name}/kiln_offsets"], [f"{name}/kiln_offset_terms"],
                               name=f"{name}/kiln_offset_terms"),
              helper.make_node("Add", [main, f"{name}/kiln_offset_terms"], [out], name=f"{name}/kiln_add_offsets")]
    return nodes, inits


def _group_offsets(graph: Any, node: Any, extra: Tensor, block: int,
                   group_sums: dict[str, str]) -> tuple[int, list[Any]]:
    """Make `node` (a symmetric MatMulNBits now) also add x's group sums times `extra` [N, groups].

    Returns (index of node, the nodes to insert after it): the caller inserts them once its walk over the
    graph is done. The group sums are computed once for every node that reads the same input; then one
    MatMul and one Add per node. Few nodes matter more than their arithmetic here: each node costs ORT
    some microseconds per call, while the sums cost K and the terms groups x N multiply-adds.
    """
    from onnx import numpy_helper

    index = list(graph.node).index(node)
    x, name, main = node.input[0], node.name, f"{node.name}/kiln_symmetric"
    nodes, inits = group_offset_nodes(x, main, node.output[0], name, node_k(node), block, extra.shape[1],
                                      group_sums.get(x))
    group_sums.setdefault(x, f"{name}/kiln_group_sums")
    inits[f"{name}/kiln_offsets"] = extra.t().contiguous().numpy().astype(np.float32)
    graph.initializer.extend(numpy_helper.from_array(array, init) for init, array in inits.items())
    node.output[0] = main
    return index, nodes


LOGITS_TO_KEEP = "logits_to_keep"
RUNTIME_FILE = "kiln.onnx"  # model.onnx with the logits_to_keep input; kiln's runtime runs this one


def keep_last_logits(folder: Path) -> None:
    """Write kiln.onnx: model.onnx with lm_head run on the last `logits_to_keep` positions only.

    The builder's graph runs lm_head on every position; a 512-token prefill then spends a tenth of its
    work, and 100 MB of output, on logits nobody reads (the engine samples from the last position only,
    as llama.cpp computes only the logits it is asked for). A Slice before lm_head keeps the last
    `logits_to_keep` positions. model.onnx stays as the builder wrote it, for ORT GenAI's generator,
    which does not know the extra input; both graphs read the one weights file.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    graph = graph_model.graph
    head = next(n for n in graph.node if "logits" in n.output)
    if head.name.endswith("/kiln_add_offsets"):  # an asymmetric int4 head: its matmul is the Add's first input
        head = next(n for n in graph.node if head.input[0] in n.output)
    hidden = head.input[0]
    kept = hidden + "/last_positions"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend([numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), "/kiln/slice_end"),
                              numpy_helper.from_array(np.array([1]), "/kiln/slice_axis")])
    start = "/kiln/slice_start"
    nodes = [helper.make_node("Neg", [LOGITS_TO_KEEP], [start], name="/kiln/Neg"),
             helper.make_node("Slice", [hidden, start, "/kiln/slice_end", "/kiln/slice_axis"], [kept],
                              name="/kiln/last_positions")]
    readers = [n for n in graph.node if hidden in n.input]  # the head, and its group sums if it has them
    index = min(list(graph.node).index(n) for n in readers)
    for reader in readers:
        reader.input[list(reader.input).index(hidden)] = kept
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    onnx.save_model(graph_model, str(folder / RUNTIME_FILE))  # its weights stay in model.onnx.data


PREFILL_FILE = "kiln-prefill.onnx"  # kiln.onnx with the int4 layers widened to int8 blocks, for prompt chunks
PREFILL_DATA = "kiln-prefill.onnx.data"  # those int8 blocks; the graph reads everything else from model.onnx.data
WIDEN = 120  # int4 codes and zero points + 120 are the int8 ones: (q + 120) - (z + 120) = q - z, 8 + 120 = 128


def write_prefill_graph(folder: Path) -> bool:
    """Write kiln-prefill.onnx beside kiln.onnx when the export has int4 layers; True if written.

    The same graph, with every int4 MatMulNBits of the layers widened to an 8-bit one over the same
    weights: each code and zero point + 120, the same scales (int8's default zero point, 128, is int4's
    8 + 120). Both run at accuracy level 4 (activations rounded to int8 per block, as llama.cpp's kernels
    do), where ONNX Runtime's 8-bit kernel runs a many-row prompt faster than its 4-bit one: on the AMD
    EPYC a 512-token prompt of the default model took 917.9 tok/s widened, 844.0 in int4 at level 4, 762.4
    in int4 at level 1 (fp32 activations, the prefill graph before this) and 655.6 widened at level 1;
    widened beat the int4 decode graph from 16 rows up (BENCHMARKS.md: Engine). The onnxruntime runtime
    runs prompt chunks of PREFILL_ROWS tokens or more on this graph (engine/onnx_runtime.py). Its session
    holds about 140 MB for the default model in groups of 32 (the prefill graph before this: 87 MB). A
    head whose blocks the embedding lookup shares stays int4: it runs on a prompt's last position only.
    """
    import onnx
    from onnx import external_data_helper, numpy_helper

    from kiln.compress.quantize import grid

    def unpacked(name: str) -> np.ndarray:  # a 4-bit initializer's values, one byte each, along its rows
        packed = numpy_helper.to_array(inits[name], str(folder))  # read-only: torch takes a copy
        return grid.unpack_int4(torch.tensor(packed.reshape(packed.shape[0], -1))).numpy()

    graph_model = onnx.load(str(folder / RUNTIME_FILE), load_external_data=False)
    graph = graph_model.graph
    inits = {t.name: t for t in graph.initializer}
    lookups = {i for n in graph.node if n.op_type != "MatMulNBits" for i in n.input}  # blocks another node reads
    widened: list[Any] = []
    with open(folder / PREFILL_DATA, "wb") as data:
        def put(name: str, array: np.ndarray) -> str:
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            offset = data.seek(0, os.SEEK_END)
            offset += -offset % 4096  # each tensor page-aligned, as onnx's own writer places them
            data.seek(offset)
            data.write(tensor.raw_data)
            external_data_helper.set_external_data(tensor, PREFILL_DATA, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            widened.append(tensor)
            return name

        for node in graph.node:
            attrs = {a.name: a for a in node.attribute}
            if node.op_type != "MatMulNBits" or attrs["bits"].i != 4 or node.input[1] in lookups:
                continue
            blocks = list(inits[node.input[1]].dims)[:2]  # [N, blocks, block / 2]
            codes = unpacked(node.input[1]).reshape(*blocks, -1)
            node.input[1] = put(f"{node.input[1]}_kiln_int8", codes + WIDEN)
            if len(node.input) > 3 and node.input[3]:  # 4-bit zero points [N, ceil(blocks / 2)] -> one byte each
                zeros = unpacked(node.input[3])[:, : blocks[1]]
                node.input[3] = put(f"{node.input[3]}_kiln_int8", zeros + WIDEN)
            attrs["bits"].i = 8
            attrs["accuracy_level"].i = 4
    if not widened:
        (folder / PREFILL_DATA).unlink()
        return False
    graph.initializer.extend(widened)
    # the int4 blocks only the decode graph reads are dropped from this graph, so its session never loads them
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save_model(graph_model, str(folder / PREFILL_FILE))  # the rest stays in model.onnx.data
    return True


# The prompts the export's check runs, by the graph that runs them. Short ones (under the runtime's
# PREFILL_ROWS tokens) run on kiln.onnx, the graph that decodes; a long one on the prefill graph where the
# export has one (else kiln.onnx again).
CHECK_PROMPTS = (
    ("The capital of France is Paris. It is",
     "Once upon a time there was a little girl who lived in a village near the forest. Whenever she went "
     "out, she wore a red"),
    ("The Eiffel Tower was built in 1889 for the World's Fair in Paris. At first many artists disliked it, "
     "but it soon became the symbol of the city and of France itself, and millions climb it every year",),
)


def logit_error(loaded: LoadedModel, folder: Path, prompts: tuple[tuple[str, ...], ...] = CHECK_PROMPTS) -> float:
    """How far the export's logits are from kiln's: per group of prompts, the median over their positions
    of max |ONNX logits - kiln logits| relative to kiln's logit range at that prompt; the worst group.

    The median position, not the worst one: int4 decode rounds activations to int8 (accuracy level 4),
    and a correct export's worst position then lands anywhere from 0.04 to 0.10 of the range depending
    on the prompt (two exports of one int4 g128 artifact: 0.105 and 0.068 on one prompt, 0.058 and 0.089
    on another), so a cap on the worst position refused correct exports at random. A wrong graph (a
    missing offset, the wrong zero points) moves every position.
    """
    from kiln.engine.onnx_runtime import OnnxModel

    model = OnnxModel(folder, loaded.spec)
    worst = 0.0
    for group in prompts:
        errors = []
        for text in group:
            ids = loaded.tokenizer.encode(text)
            with torch.inference_mode():
                want = loaded.model(torch.tensor([ids]), logits="all")[0].float()
            got = model.logits_all(ids)
            errors.append((got - want).abs().amax(-1) / (want.max() - want.min()))
        worst = max(worst, float(torch.cat(errors).median()))
    return worst
