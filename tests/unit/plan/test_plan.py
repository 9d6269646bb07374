"""Planning: memory formulas, the roofline estimate on a fixed profile, and specs from configs alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.errors import InvalidParameterError
from kiln.model.info import spec_of
from kiln.model.spec import ModelSpec
from kiln.plan import estimate, memory
from kiln.plan.profile import MachineProfile, ProbeRun, _interpolate, fit_probe, fit_step_costs, prefill_efficiency

SMOL = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "tie_word_embeddings": True}
TORCH = ("torch:fp32", "torch:bf16", "torch:int8", "torch:int4")
ONNX = ("onnxruntime:fp32", "onnxruntime:int8", "onnxruntime:int4")


def profile_with(keys: tuple[str, ...]) -> MachineProfile:
    """A fixed profile; onnxruntime's weights stream at half torch's seconds per byte, so the plans differ."""
    def per_byte(key: str) -> dict[str, float]:
        factor = 0.5 if key.startswith("onnxruntime") else 1.0
        return {"1": 4e-11 * factor, "4": 6e-11 * factor, "16": 8e-11 * factor}

    return MachineProfile(
        cpu="test", threads=2, read_bandwidth_gbs=25.0,
        seconds_per_weight_byte={k: per_byte(k) for k in keys},
        prefill_gflops={k: 600.0 if k == "torch:bf16" else 300.0 for k in keys},
        prefill_efficiency={k: 0.5 for k in keys},
        layer_overhead_s={k: {"1": 1e-4, "4": 1.2e-4, "16": 2e-4} for k in keys},
        step_overhead_s={k: {"1": 1e-3, "4": 2e-3, "16": 5e-3} for k in keys},
        kv_seconds_per_byte={k: {"1": 5e-11, "4": 3e-11, "16": 3e-11} for k in keys},
        runtime_bytes=250_000_000,
        **({"offset_matrix_s": {"1": 1e-5, "4": 1.2e-5, "16": 2e-5},
            "offset_seconds_per_byte": {"1": 3e-11, "4": 5e-11, "16": 2e-10},
            # int4 in groups of 32 streams a quarter slower per byte than in groups of 128 (the engine key's)
            "int4_group_seconds_per_byte": {str(g): {b: v * f for b, v in per_byte("onnxruntime:int4").items()}
                                            for g, f in ((32, 1.25), (64, 1.1), (128, 1.0))}}
           if any(k.startswith("onnxruntime:") for k in keys) else {}),
    )


PROFILE = profile_with(TORCH + ONNX)
TORCH_ONLY = profile_with(TORCH)  # a machine calibrated without ONNX Runtime installed


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec.from_hf_config(SMOL)


def test_weights_by_precision(spec: ModelSpec) -> None:
    assert spec.num_parameters == 134_515_008
    assert memory.weights_bytes(spec, "fp32") == 4 * 134_515_008
    assert memory.weights_bytes(spec, "bf16") == 2 * 134_515_008
    assert memory.weights_bytes(spec, "int4") == int(134_515_008 * (0.5 + 8 / 128))
    assert 134_515_008 < memory.weights_bytes(spec, "int8") < 1.01 * 134_515_008


def test_kv_cache(spec: ModelSpec) -> None:
    per_token = 30 * 3 * 64 * 2 * 4  # layers x KV heads x head dim x (K, V) x fp32
    assert memory.kv_cache_bytes(spec, "fp32", 1000, 4) == per_token * 1000 * 4
    assert memory.kv_cache_bytes(spec, "bf16", 1000, 4) == per_token * 1000 * 2


def test_decode_estimate_is_the_roofline_sum(spec: ModelSpec) -> None:
    plan = estimate.estimate(spec, "fp32", 640, 1, PROFILE, "torch")
    attended = 30 * 3 * 64 * 2 * 4  # each cached token's keys and values, KV heads only
    step = plan.weights_bytes * 4e-11 + attended * 640 * 5e-11 + 30 * 1e-4 + 1e-3
    assert plan.decode_tokens_per_s == pytest.approx(1 / step)
    assert plan.total_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.activations_bytes + 250_000_000
    assert any("effective" in line for line in plan.explanation)


def test_fewer_bits_decode_faster_and_batches_add_up(spec: ModelSpec) -> None:
    for runtime in ("torch", "onnxruntime"):
        speeds = [estimate.estimate(spec, p, 2048, 1, PROFILE, runtime).decode_tokens_per_s
                  for p in ("fp32", "int8", "int4")]
        assert speeds == sorted(speeds)
    one, sixteen = (estimate.estimate(spec, "fp32", 2048, c, PROFILE) for c in (1, 16))
    assert sixteen.total_decode_tokens_per_s > one.total_decode_tokens_per_s > sixteen.decode_tokens_per_s


def test_recommendation_names_every_class(spec: ModelSpec) -> None:
    lines = estimate.recommend(spec, 2048, 8, 500.0, PROFILE)
    assert lines[0].startswith("this machine:") and len(lines) == 1 + len(estimate.HARDWARE_CLASSES)
    assert "datacenter GPU" in lines[-1] and "does not meet" not in lines[-1]


def test_interpolation_between_batches() -> None:
    points = {1: 1.0, 4: 3.0}
    assert _interpolate(points, 1) == 1.0 and _interpolate(points, 2) == pytest.approx(2.0)
    assert _interpolate(points, 8) == pytest.approx(6.0)  # past the last point: grows with the batch


def test_probe_fit_recovers_the_engine_costs() -> None:
    per_layer, per_step, per_kv_byte = 3e-4, 2e-3, 4e-11

    def run(layers: int, stream_s: float, kv_bytes: float) -> ProbeRun:
        step = stream_s + layers * per_layer + per_step + kv_bytes * per_kv_byte
        return ProbeRun(step_s=step, stream_s=stream_s, kv_bytes=kv_bytes, layers=layers)

    fitted = fit_step_costs(run(16, 0.010, 2e7), run(16, 0.010, 3e8), run(8, 0.006, 1e7))
    assert fitted == pytest.approx((per_layer, per_step, per_kv_byte))
    # a noisy run that makes the KV look free is clipped, not negative
    noisy = fit_step_costs(run(16, 0.010, 2e7), ProbeRun(0.001, 0.010, 3e8, 16), run(8, 0.006, 1e7))
    assert min(noisy) >= 0.0


def test_spec_from_a_bare_config(tmp_path: Path) -> None:
    path = tmp_path / "my-config.json"
    path.write_text(json.dumps(SMOL))
    assert spec_of(str(path)).num_parameters == 134_515_008
    # a folder with only its config.json (no weights downloaded yet) plans as well
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOL))
    assert spec_of(str(folder)).num_parameters == 134_515_008


def test_spec_from_the_default_gguf_header() -> None:
    assert spec_of("default").num_layers == 30


def test_bf16_counts_the_tied_heads_packed_copy_in_memory_not_in_reads(spec: ModelSpec) -> None:
    copy = 49152 * 576 * 2
    assert memory.packed_head_bytes(spec, "bf16") == copy and memory.packed_head_bytes(spec, "fp32") == 0
    bf16 = estimate.estimate(spec, "bf16", 640, 1, PROFILE)
    assert bf16.runtime == "torch"  # onnxruntime does not run bf16
    assert bf16.weights_bytes == memory.weights_bytes(spec, "bf16") + copy
    assert bf16.total_bytes == bf16.weights_bytes + bf16.kv_cache_bytes + bf16.activations_bytes + 250_000_000
    attended = 30 * 3 * 64 * 2 * 2
    step = memory.weights_bytes(spec, "bf16") * 4e-11 + attended * 640 * 5e-11 + 30 * 1e-4 + 1e-3
    assert bf16.decode_tokens_per_s == pytest.approx(1 / step)


def test_auto_plans_the_runtime_the_other_commands_pick(spec: ModelSpec) -> None:
    assert [estimate.estimate(spec, p, 640, 1, PROFILE).runtime for p in ("fp32", "bf16", "int8", "int4")] == \
        ["onnxruntime", "torch", "onnxruntime", "onnxruntime"]
    assert estimate.estimate(spec, "int4", 640, 1, TORCH_ONLY).runtime == "torch"
    odd = ModelSpec.from_hf_config({**SMOL, "hidden_size": 72 * 9})  # head size 72: ONNX Runtime refuses it
    assert estimate.estimate(odd, "fp32", 640, 1, PROFILE).runtime == "torch"
    with pytest.raises(InvalidParameterError, match="bf16"):
        estimate.estimate(spec, "bf16", 640, 1, PROFILE, "onnxruntime")
    with pytest.raises(InvalidParameterError, match="--calibrate"):
        estimate.estimate(spec, "int4", 640, 1, TORCH_ONLY, "onnxruntime")


def test_an_onnxruntime_plan_uses_its_costs_and_counts_the_sessions_copy(spec: ModelSpec,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch_plan, onnx_plan = (estimate.estimate(spec, "int8", 640, 1, PROFILE, r) for r in ("torch", "onnxruntime"))
    weights = memory.weights_bytes(spec, "int8")
    assert torch_plan.weights_bytes == weights
    # the session holds the int8 weights with a scale and a sum per block of 64 (no scale per row), and an fp32
    # table for the
    # tied embedding's lookup; kiln's own copy is let go before the session loads, so it counts only while
    # loading (here the smaller of the two)
    assert onnx_plan.weights_bytes == int(spec.num_parameters * (1 + 8 / 64)) + 49152 * 576 * 4
    assert onnx_plan.total_bytes == (onnx_plan.weights_bytes + onnx_plan.kv_cache_bytes
                                     + onnx_plan.activations_bytes + 250_000_000)
    cached = 30 * 3 * 64 * 2 * 4 * 640
    fixed = 30 * 1e-4 + 1e-3
    # ONNX Runtime's attention reads the cache once per query head (9 of them over 3 KV heads)
    assert onnx_plan.decode_tokens_per_s == pytest.approx(1 / (weights * 2e-11 + 3 * cached * 5e-11 + fixed))
    assert torch_plan.decode_tokens_per_s == pytest.approx(1 / (weights * 4e-11 + cached * 5e-11 + fixed))
    assert "the session holds its own copy" in " ".join(onnx_plan.explanation)
    # its keys and values: each sequence's once, fp32, in a buffer with room for a quarter more tokens
    per_token = 30 * 3 * 64 * 2 * 4
    assert onnx_plan.kv_cache_bytes == per_token * (640 + 160 + 16)
    four = estimate.estimate(spec, "int8", 640, 4, PROFILE, "onnxruntime")
    assert four.kv_cache_bytes == 4 * onnx_plan.kv_cache_bytes
    # int4: the lookup reads the head's blocks, through a reshape the session folds into a copy of them,
    # and the prefill graph's session holds the weights again, its layers widened to 8-bit blocks (a byte per
    # weight, a scale and a sum per group of 128); fp32: through a transpose, folded into a second table
    int4 = memory.weights_bytes(spec, "int4")
    layers = spec.num_parameters - 49152 * 576
    widened = int4 - layers * (0.5 + 8 / 128) + layers * (1 + 8 / 128)
    assert memory.onnx_session_bytes(spec, "int4") == int(int4 + widened + 49152 * 576 // 2)
    monkeypatch.setenv("KILN_ORT_PREFILL", "0")
    assert memory.onnx_session_bytes(spec, "int4") == int4 + 49152 * 576 // 2
    assert memory.onnx_session_bytes(spec, "fp32") == memory.weights_bytes(spec, "fp32") + 49152 * 576 * 4


def test_an_int8_onnxruntime_plan_counts_the_block_its_export_uses() -> None:
    # hidden and head sizes 32 x 17 = 544: divisible by 32 but not 64, so the export's blocks are of 32
    # (onnx_export.int8_block) and the session holds a scale and a sum per 32 weights, twice the default's
    config = {**SMOL, "hidden_size": 544, "num_attention_heads": 17, "num_key_value_heads": 1}
    spec = ModelSpec.from_hf_config(config)
    assert spec.head_dim == 32
    tied_lookup = 49152 * 544 * 4
    want = int(spec.num_parameters * (1 + 8 / 32)) + tied_lookup
    assert memory.onnx_session_bytes(spec, "int8") == want


def test_prefill_is_the_matmul_rate_times_the_measured_efficiency(spec: ModelSpec) -> None:
    plan = estimate.estimate(spec, "fp32", 2048, 1, PROFILE)
    assert plan.prefill_tokens_per_s == pytest.approx(1 / (spec.matmul_flops_per_token(256) / (300e9 * 0.5)))
    # a probe prefill that ran at a quarter of the bare rate measures an efficiency of a quarter
    seconds = 480 * spec.matmul_flops_per_token(240) / 100e9
    assert prefill_efficiency(spec, 480, seconds, 400.0) == pytest.approx(0.25)


def test_probe_fit_takes_the_median_of_three_runs_at_every_batch_size() -> None:
    per_layer, per_step, per_kv_byte = 3e-4, 2e-3, 4e-11
    calls: list[tuple[int, int, int]] = []

    def runs(batch: int, layers: int, prompt: int) -> ProbeRun:
        calls.append((batch, layers, prompt))
        kv_bytes = batch * prompt * 1e5
        step = 0.010 + layers * per_layer + per_step + kv_bytes * per_kv_byte
        # rounds go over the batch sizes in turn (1, 4, 16, 1, ...): one run at each size is disturbed
        if len(calls) in (1, 14, 26):
            step *= 3 if len(calls) < 26 else 0.3
        return ProbeRun(step_s=step, stream_s=0.010, kv_bytes=kv_bytes, layers=layers)

    layer_s, step_s, kv_s = fit_probe(runs)
    assert len(calls) == 3 * 3 * 3  # three probes, three rounds, three batch sizes
    assert [batch for batch, _, _ in calls][::3] == [1, 4, 16] * 3  # each round visits every batch size
    for batch in ("1", "4", "16"):
        assert (layer_s[batch], step_s[batch], kv_s[batch]) == pytest.approx((per_layer, per_step, per_kv_byte))


@pytest.mark.parametrize("flags", [["--concurrency", "-1"], ["--concurrency", "0"], ["--context", "-5"],
                                   ["--context", "0"], ["--target-tokens-per-s", "-3"],
                                   ["--target-tokens-per-s", "nan"]])  # NaN: "does not meet it" everywhere
def test_cli_refuses_counts_below_one(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # these once printed negative memory and speeds (or silently the model's context) with exit 0
    from kiln.cli import main

    assert main(["plan", "--json", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"kiln: error: {flags[0]} " in captured.err and "above 0" in captured.err


def test_an_int8_model_whose_sizes_onnxruntime_cannot_block_plans_torch() -> None:
    # an MLP of 1544 (a multiple of 8, not of 16): no int8 MatMulNBits block fits, so the export cannot be
    # made; --runtime auto plans torch as the other commands fall back to it, and asking for onnxruntime is
    # a one-line error rather than a StopIteration
    odd = ModelSpec.from_hf_config({**SMOL, "intermediate_size": 1544})
    assert estimate.estimate(odd, "int8", 640, 1, PROFILE).runtime == "torch"
    assert estimate.estimate(odd, "int4", 640, 1, PROFILE).runtime == "onnxruntime"
    with pytest.raises(InvalidParameterError, match="multiples of 16.*576, 576, 1544.*--runtime torch"):
        estimate.estimate(odd, "int8", 640, 1, PROFILE, "onnxruntime")


def test_cli_refuses_a_context_beyond_the_model_before_calibrating(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a context of 10^9 tokens was planned for a model of 8192 (138 TB of KV cache); the model is read
    # before the machine profile, so a bad model or context never waits on a four-minute calibration
    from kiln import cli
    from kiln.plan import profile

    def no_profile() -> None:
        raise AssertionError("the profile was read before the model was checked")

    monkeypatch.setattr(profile, "load_cached", no_profile)
    assert cli.main(["plan", "--context", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "kiln: error: --context 1000000000 is more than the model's context of 8192 tokens" in err


def test_an_artifact_whose_config_was_modified_is_refused(tmp_path: Path) -> None:
    # generate and info refused it; plan read the modified config and planned the wrong model with exit 0
    from kiln.artifact.manifest import Manifest
    from kiln.errors import ModelFormatError

    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    Manifest(source={}, recipe={}, files={"config.json": "0" * 64}).write(tmp_path)
    with pytest.raises(ModelFormatError, match="config.json does not match its sha256"):
        spec_of(str(tmp_path))


@pytest.mark.parametrize("damage", [
    lambda p: p.update(read_bandwidth_gbs="fast"),
    lambda p: p.update(seconds_per_weight_byte={}),
    lambda p: p["prefill_gflops"].update({"torch:int4": None}),
    lambda p: p["kv_seconds_per_byte"].update({"torch:fp32": {}}),
    lambda p: p["layer_overhead_s"]["torch:bf16"].pop("16"),
    lambda p: p["step_overhead_s"]["onnxruntime:int8"].update({"4": float("nan")}),
    lambda p: p.update(offset_matrix_s={}),  # onnxruntime costs without the float offsets' (a version-5 profile)
    lambda p: p["offset_seconds_per_byte"].update({"1": -1.0}),
    lambda p: p["int4_group_seconds_per_byte"].pop("32"),
])
def test_a_damaged_cached_profile_is_measured_again(damage, tmp_path: Path,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # each ended `kiln plan` in a TypeError, KeyError or IndexError traceback instead of a new calibration
    import dataclasses

    import torch

    from kiln.benchmark.machine import cpu_name
    from kiln.plan import profile

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    data = dataclasses.asdict(dataclasses.replace(PROFILE, cpu=cpu_name(), threads=torch.get_num_threads()))
    profile.profile_path().write_text(json.dumps(data))
    assert profile.load_cached() is not None
    damage(data)
    profile.profile_path().write_text(json.dumps(data))
    assert profile.load_cached() is None


@pytest.mark.parametrize("formats,planned", [(("int8",), "int8"), (("int4", "int8"), "int4"), ((), "fp32")])
def test_an_artifact_is_planned_at_its_own_precision(formats: tuple[str, ...], planned: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # `kiln plan -m demo/int8` planned fp32: 538 MB of weights for a 220 MB artifact, at fp32 kernels' speed
    import dataclasses

    import torch

    from kiln import cli
    from kiln.artifact.manifest import Manifest, file_sha256
    from kiln.benchmark.machine import cpu_name
    from kiln.plan import profile

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    profile.profile_path().parent.mkdir()
    data = dataclasses.asdict(dataclasses.replace(PROFILE, cpu=cpu_name(), threads=torch.get_num_threads()))
    profile.profile_path().write_text(json.dumps(data))
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOL))
    tensors = {f"layers.{i}.mlp.down_proj": {"format": f, "shape": [576, 1536]} for i, f in enumerate(formats)}
    Manifest(source={}, recipe={}, tensors=tensors,
             files={"config.json": file_sha256(folder / "config.json")}).write(folder)
    assert cli.main(["plan", "-m", str(folder), "--context", "1024", "--runtime", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == planned
    assert cli.main(["plan", "-m", str(folder), "--context", "1024", "--precision", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"  # asked for by name, it is planned


TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _int8_artifact_keeping_the_head(folder: Path, tied: bool) -> dict[str, int]:
    """An int8 artifact as `kiln compress --quantize int8` makes by default (keep_embeddings): int8 layers, the
    embedding and head in fp32. Returns each tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    from kiln.artifact.manifest import Manifest, file_sha256

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": tied}))
    tensors = {"embed.weight": torch.zeros(256, 64), "norm.weight": torch.zeros(64),
               "layers.0.mlp.down_proj.qweight": torch.zeros(64, 128, dtype=torch.int8),
               "layers.0.mlp.down_proj.scales": torch.zeros(64)}
    if not tied:
        tensors["lm_head.weight"] = torch.zeros(256, 64)
    save_file(tensors, str(folder / "model.safetensors"))
    recipe = {"steps": [{"kind": "quantize", "bits": 8, "method": "rtn", "keep_embeddings": True}]}
    Manifest(source={}, recipe=recipe, tensors={"layers.0.mlp.down_proj": {"format": "int8", "shape": [64, 128]}},
             files={"config.json": file_sha256(folder / "config.json")}).write(folder)
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_an_artifact_is_priced_by_its_own_tensors(tied: bool, tmp_path: Path) -> None:
    # `kiln plan -m demo/int8` priced all 134.5M parameters at 1 B: 135 MB streamed per token, where the artifact
    # keeps its tied head in fp32 (113 MB more) and a decode step reads 220 MB, at fp32 matmul's rate for the head
    import dataclasses

    from kiln.model.info import artifact_layout
    from kiln.model.spec import int8_block

    sizes = _int8_artifact_keeping_the_head(tmp_path / "int8", tied)
    layout = artifact_layout(str(tmp_path / "int8"))
    assert layout is not None and (layout.layers, layout.head) == ("int8", "fp32")
    table = 256 * 64 * 4
    assert layout.stored_bytes == sum(sizes.values())
    assert layout.head_bytes == table
    assert layout.lookup_bytes == (0 if tied else table)  # an untied embedding is looked up, not streamed
    spec = spec_of(str(tmp_path / "int8"))
    rates = {**PROFILE.seconds_per_weight_byte, "torch:fp32": {"1": 9e-11, "4": 9e-11, "16": 9e-11}}
    machine = dataclasses.replace(PROFILE, seconds_per_weight_byte=rates)
    plan = estimate.estimate(spec, "int8", 128, 1, machine, "torch", layout)
    assert plan.weights_bytes == sum(sizes.values())
    streamed = sum(sizes.values()) - layout.lookup_bytes
    cached = 2 * 2 * 16 * 2 * 4 * 128
    want_step = (streamed - table) * 4e-11 + table * 9e-11 + cached * 5e-11 + 2 * 1e-4 + 1e-3
    assert plan.decode_tokens_per_s == pytest.approx(1 / want_step)
    assert "lm_head fp32" in " ".join(plan.explanation)
    # onnxruntime: the layers in MatMulNBits blocks, the head as an fp32 MatMul, and an fp32 lookup table
    layer_params = spec.num_parameters - 256 * 64 * (1 if tied else 2)
    want = int(layer_params * (1 + 8 / int8_block(spec)) + 2 * table)
    assert memory.onnx_session_bytes(spec, layout) == want
    # asked for a precision by name, the model is priced at it throughout
    assert memory.onnx_session_bytes(spec, "int8") < want


def test_a_sparse_artifacts_matrices_are_priced_dense_as_they_load(tmp_path: Path) -> None:
    # values and a bit mask on disk (artifact/io._sparse), a dense fp32 matrix once loaded (_dense)
    import torch
    from safetensors.torch import save_file

    from kiln.artifact.manifest import Manifest, file_sha256
    from kiln.model.info import artifact_layout

    folder = tmp_path / "wanda"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    save_file({"embed.weight": torch.zeros(256, 64), "layers.0.mlp.down_proj.values": torch.zeros(4096),
               "layers.0.mlp.down_proj.mask": torch.zeros(1024, dtype=torch.uint8)}, str(folder / "model.safetensors"))
    Manifest(source={}, recipe={"steps": [{"kind": "prune", "sparsity": 0.5}]},
             tensors={"layers.0.mlp.down_proj": {"format": "sparse", "shape": [64, 128], "density": 0.5}},
             files={"config.json": file_sha256(folder / "config.json")}).write(folder)
    layout = artifact_layout(str(folder))
    assert layout is not None and (layout.layers, layout.head) == ("fp32", "fp32")
    assert layout.stored_bytes == 256 * 64 * 4 + 64 * 128 * 4


@pytest.mark.parametrize("step,split", [
    ({"bits": 4, "group_size": 32}, True),  # Q4_1's grid: the group minimum, a float offset
    ({"bits": 4, "group_size": 32, "zero_point": "float"}, True),
    ({"bits": 4, "group_size": 32, "zero_point": "integer"}, False),  # MatMulNBits takes the zero points
    ({"bits": 4, "group_size": 32, "symmetric": True}, False),
])
def test_float_int4_offsets_are_priced_where_onnxruntime_splits_them_off(step: dict[str, object], split: bool,
                                                                        tmp_path: Path) -> None:
    # demo/int4 (Q4_1's grid in groups of 32) was planned at 150 tok/s on onnxruntime against 94 measured: each
    # of its 150 int4 matrices runs a MatMulNBits, then a sum per group, a small matmul and an add
    import torch
    from safetensors.torch import save_file

    from kiln import settings
    from kiln.artifact.manifest import Manifest, file_sha256
    from kiln.model.info import artifact_layout

    folder = tmp_path / "int4"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    save_file({"embed.weight": torch.zeros(256, 64), "layers.0.mlp.down_proj.qweight": torch.zeros(64, 64,
                                                                                                  dtype=torch.uint8)},
              str(folder / "model.safetensors"))
    Manifest(source={}, recipe={"steps": [{"kind": "quantize", "method": "rtn", **step}]},
             tensors={"layers.0.mlp.down_proj": {"format": "int4", "shape": [64, 128], "group_size": 32}},
             files={"config.json": file_sha256(folder / "config.json")}).write(folder)
    layout = artifact_layout(str(folder))
    assert layout is not None and layout.float_offsets is split
    spec = spec_of(str(folder))
    matrices, offsets = memory.split_offsets(spec, layout)
    layer_params = spec.num_parameters - 256 * 64
    assert (matrices, offsets) == ((5 * 2, int(4 * layer_params / 32)) if split else (0, 0))
    no_split = replace(layout, float_offsets=False)
    # the session holds the offsets as fp32 matrices, and so does the prefill graph's
    graphs = 2 if settings.ort_prefill_graph() else 1
    assert memory.onnx_session_bytes(spec, layout) - memory.onnx_session_bytes(spec, no_split) == graphs * offsets
    plain = estimate.estimate(spec, "int4", 128, 1, PROFILE, "onnxruntime", no_split)
    plan = estimate.estimate(spec, "int4", 128, 1, PROFILE, "onnxruntime", layout)
    added = 1 / plan.decode_tokens_per_s - 1 / plain.decode_tokens_per_s
    assert added == pytest.approx(matrices * 1e-5 + offsets * 3e-11)
    assert ("float int4 offsets split off 10 matrices" in " ".join(plan.explanation)) is split
    # the torch runtime holds the offsets beside the codes whatever their kind: nothing is split there
    on_torch = estimate.estimate(spec, "int4", 128, 1, PROFILE, "torch", layout)
    assert on_torch.decode_tokens_per_s == estimate.estimate(spec, "int4", 128, 1, PROFILE, "torch",
                                                             replace(layout, float_offsets=False)).decode_tokens_per_s


def test_onnxruntime_int4_is_priced_at_its_group_sizes_rate(spec: ModelSpec) -> None:
    # MatMulNBits streamed int4 in groups of 32 at 26 GB/s against 32.5 in groups of 128 (this machine, one
    # process, alternating): demo/int4 and other g32 artifacts were planned at g128's rate
    g128 = replace(memory.Layout.uniform("int4"), group=128)
    plans = {g: estimate.estimate(spec, "int4", 128, 1, PROFILE, "onnxruntime", replace(g128, group=g))
             for g in (32, 128)}
    weights = memory.weights_bytes(spec, "int4")
    slower = 1 / plans[32].decode_tokens_per_s - 1 / plans[128].decode_tokens_per_s
    assert slower == pytest.approx(weights * 0.25 * PROFILE.per_byte("onnxruntime:int4", 1))
    assert "MatMulNBits, 4 bits in groups of 32" in " ".join(plans[32].explanation)
    # the torch runtime widens int4 whatever its groups: one rate
    on_torch = [estimate.estimate(spec, "int4", 128, 1, PROFILE, "torch", replace(g128, group=g)) for g in (32, 128)]
    assert on_torch[0].decode_tokens_per_s == on_torch[1].decode_tokens_per_s
