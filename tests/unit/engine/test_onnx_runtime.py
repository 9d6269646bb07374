"""The onnxruntime runtime: `kiln export --format onnx` reproduces the source, and the engine runs it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.artifact import onnx_export
from kiln.compress.pipeline import compress
from kiln.compress.recipe import Quantize, Recipe
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.onnx_runtime import PREFILL_ROWS, OnnxModel
from kiln.engine.sampler import SamplingParams
from kiln.errors import InvalidParameterError
from kiln.model.load import LoadedModel, load

pytest.importorskip("onnxruntime_genai", reason="the onnx extra is not installed: pip install 'lmkiln[onnx]'")


def greedy(model: object, loaded: LoadedModel, prompts: list[list[int]], max_batch_tokens: int = 16) -> list[list[int]]:
    config = EngineConfig(kv_budget_bytes=8 << 20, max_batch_tokens=max_batch_tokens)
    engine = Engine(model, loaded.tokenizer, config)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [engine.add_request(p, params) for p in prompts]
    engine.run()
    return [r.output for r in requests]


@pytest.fixture(scope="module")
def onnx_tiny_folder(default_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama whose head size (16) ONNX Runtime's GroupQueryAttention accepts."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=default_model.spec.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    folder = tmp_path_factory.mktemp("onnx-tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model.folder / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(onnx_tiny_folder: Path) -> LoadedModel:
    return load(str(onnx_tiny_folder), progress=False)


@pytest.fixture(scope="module")
def tiny_onnx(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checked fp32 export of `tiny` for the tests that only run it: each export spends about 6 s, most
    of it starting the builder's process. A test that changes an export copies this one first."""
    return onnx_export.export(tiny, tmp_path_factory.mktemp("tiny-onnx") / "onnx", "fp32")


@pytest.fixture(scope="module")
def tiny_cache(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KILN_CACHE holding the cached export `onnx_folder` builds for `tiny`, for tests to copy and damage."""
    from kiln.engine import onnx_runtime

    cache = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE", str(cache))
        onnx_runtime.onnx_folder(tiny)
    return cache


def test_head_sizes_onnx_runtime_cannot_run_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="multiple of 16"):
        onnx_export.export(load(str(tiny_folder), progress=False), tmp_path / "onnx", "fp32")


def test_fp32_export_runs_in_the_engine_with_the_same_tokens(tiny: LoadedModel, tiny_onnx: Path) -> None:
    folder = tiny_onnx
    assert onnx_export.logit_error(tiny, folder) < 1e-4
    # the first two run as one batch (same position); the last is prefilled in two chunks
    prompts = [[1, 5, 9, 200], [1, 6, 10, 201], [1, 7], [1, *range(300, 330)]]
    assert greedy(OnnxModel(folder, tiny.spec, 1), tiny, prompts) == greedy(tiny.model, tiny, prompts)


def test_export_shows_its_stages(tiny: LoadedModel, tmp_path: Path, recorded_bars: Callable[[object], list[Any]]
                                 ) -> None:
    # the builder ran for half a minute on the default model with no bar after the load's
    bars = recorded_bars(onnx_export)
    onnx_export.export(tiny, tmp_path / "onnx", "fp32")
    [bar] = bars
    assert bar.disable is None and bar.total == 3 and bar.done == 3  # build, check, write


def test_decode_rows_at_different_positions_run_as_one_batch(tiny: LoadedModel, tiny_onnx: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences of different lengths decode in one session run, with the log-probabilities each gets alone;
    one of them stops early, so the batch changes members midway, and the last decodes alone. While they
    decode together their keys and values are held once: in the batch buffer, not in their own too."""
    folder = tiny_onnx
    prompts = [[1, *range(500, 504)], [1, *range(600, 616)], [1, *range(700, 729)]]
    lengths = {len(p): n for p, n in zip(prompts, (8, 3, 40), strict=True)}  # 40: past the first capacity
    onnx = OnnxModel(folder, tiny.spec, 1)
    batches: list[int] = []
    held_twice: list[int] = []  # decode rows that still had buffers of their own after a batched step
    real_batch = onnx._run_batch

    def run_batch(ids: Any, seqs: list[int], starts: list[int]) -> Any:
        batches.append(len(set(starts)))
        logits = real_batch(ids, seqs, starts)
        if ids.shape[1] == 1:
            assert onnx._batch is not None and onnx._batch.seqs == seqs
            held_twice.extend(s for s in seqs if s in onnx.states)
        return logits

    monkeypatch.setattr(onnx, "_run_batch", run_batch)

    def run(group: list[list[int]]) -> list[list[float]]:
        engine = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20))  # type: ignore[arg-type]
        requests = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=lengths[len(p)],
                                                         ignore_eos=True, logprobs=0)) for p in group]
        engine.run()
        return [[p.logprob for p in r.logprobs] for r in requests]

    together = run(prompts)
    assert batches and max(batches) == 3  # three rows, three positions, one run
    assert not held_twice
    # each sequence's buffers went as the engine freed its blocks, not at a next step that never came
    assert onnx._batch is None and not onnx.states and not onnx.lengths
    alone = [run([p])[0] for p in prompts]
    for got, want in zip(together, alone, strict=True):
        assert len(got) == len(want) and torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)


def test_cancelling_frees_the_onnx_runtimes_buffers_at_once(tiny: LoadedModel, tiny_onnx: Path) -> None:
    folder = tiny_onnx
    onnx = OnnxModel(folder, tiny.spec, 1)
    engine = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20))  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    requests = [engine.add_request([1, *range(500 + 20 * i, 510 + 20 * i)], params) for i in range(3)]
    for _ in range(4):  # the prompts, then decode steps of all three in one batch
        engine.step()
    assert onnx._batch is not None and len(onnx._batch.seqs) == 3 and not onnx.states
    assert engine.abort(requests[0].request_id)
    assert requests[0].seq_id not in onnx.lengths and requests[0].seq_id not in onnx._batch.seqs
    engine.step()  # the other two move to a batch of their own
    assert onnx._batch is not None and len(onnx._batch.seqs) == 2
    for r in requests[1:]:
        assert engine.abort(r.request_id)
    assert onnx._batch is None and not onnx.states and not onnx.lengths


def test_requests_arriving_and_preempted_keep_their_logprobs_on_the_onnx_runtime(
        tiny: LoadedModel, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode batch gains and loses rows as requests arrive, finish, attach a cached prefix and are
    preempted by a small budget, and its buffers grow (a first capacity of 16 tokens here); each request
    keeps the log-probabilities it gets alone, and no buffer outlives its sequence."""
    import random

    from kiln.engine import onnx_runtime

    monkeypatch.setattr(onnx_runtime, "FIRST_CAPACITY", 16)
    folder = tiny_onnx
    onnx = OnnxModel(folder, tiny.spec, 1)
    rng = random.Random(0)
    prefix = [1, *range(900, 931)]  # two full blocks that every third prompt shares
    prompts = [(prefix if i % 3 == 0 else [1]) + [rng.randint(100, 40000) for _ in range(rng.randint(2, 30))]
               for i in range(16)]
    prompts[5] = prompts[6] = [1]  # one-token prompts arriving together: their chunks run as a decode batch
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 40), ignore_eos=True, logprobs=0)
              for _ in prompts]
    arrival = sorted(rng.randint(0, 30) for _ in prompts)
    arrival[6] = arrival[5]
    per_block = 16 * tiny.spec.kv_bytes_per_token(4)
    engine = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=20 * per_block,  # type: ignore[arg-type]
                                                       max_batch_tokens=48))
    requests: dict[int, Any] = {}
    step = 0
    while len(requests) < len(prompts) or engine.has_work:
        for i in range(len(prompts)):
            if i not in requests and arrival[i] <= step:
                requests[i] = engine.add_request(prompts[i], params[i])
        engine.step()
        step += 1
    assert sum(r.num_preemptions for r in requests.values()) > 0, "the budget should force preemption"
    assert any(r.cached_tokens for r in requests.values())
    assert onnx._batch is None and not onnx.states and not onnx.lengths
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        single = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20))  # type: ignore[arg-type]
        want = single.add_request(prompt, sp)
        single.run()
        got = [p.logprob for p in requests[i].logprobs]
        assert len(got) == sp.max_tokens and requests[i].output == want.output, f"request {i}"
        assert torch.allclose(torch.tensor(got), torch.tensor([p.logprob for p in want.logprobs]), atol=1e-4)


def test_prefix_caching_on_the_onnx_runtime_gives_the_same_tokens(tiny: LoadedModel, tiny_onnx: Path) -> None:
    folder = tiny_onnx
    prefix = [1, *range(400, 439)]  # 40 tokens: two full blocks of 16 can be shared
    # the two later prompts are equally long: their uncached parts start at the same position with the same
    # width (ONNX Runtime's attention runs such prompt chunks over a past one sequence at a time)
    tails = [[7, 8, 9, 10, 11], [12, 13, 19], [14, 15, 16]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)

    def run(model: object, prefix_caching: bool) -> tuple[list[list[float]], list[int]]:
        engine = Engine(model, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20,  # type: ignore[arg-type]
                                                            prefix_caching=prefix_caching))
        first = engine.add_request(prefix + tails[0], params)
        engine.run()  # finished: its prompt blocks stay cached
        rest = [engine.add_request(prefix + t, params) for t in tails[1:]]  # both attach; then one batch
        engine.run()
        requests = [first, *rest]
        assert bool(engine.cache.runtime_store) == (prefix_caching and model is onnx)  # the prompt was published
        return [[p.logprob for p in r.logprobs] for r in requests], [r.cached_tokens for r in requests]

    onnx = OnnxModel(folder, tiny.spec, 1)
    shared, cached = run(onnx, True)
    assert cached == [0, 32, 32]
    # the chosen tokens' log-probabilities: a wrong restored key or value moves them (tokens alone may not)
    for reference in (run(onnx, False)[0], run(tiny.model, False)[0]):
        assert torch.allclose(torch.tensor(shared), torch.tensor(reference), atol=1e-4)


def test_sampling_penalties_and_logprobs_run_on_the_onnx_runtime_as_on_torch(tiny: LoadedModel,
                                                                             tiny_onnx: Path) -> None:
    """The onnxruntime runtime's logits are numpy arrays; seeded sampling, penalties and logprobs take the same
    paths from them as from the torch model's."""
    folder = tiny_onnx
    params = [SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=10, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)]
    prompts = [[1, 5, 9, 200], [1, 6, 10, 201], [1, 7, 11]]

    def run(model: object) -> list[tuple[list[int], list[float]]]:
        engine = Engine(model, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20))  # type: ignore[arg-type]
        requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        engine.run()
        return [(r.output, [lp.logprob for lp in r.logprobs]) for r in requests]

    got, want = run(OnnxModel(folder, tiny.spec, 1)), run(tiny.model)
    for (got_tokens, got_logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert got_tokens == want_tokens
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-3)


@pytest.mark.parametrize(("symmetric", "group_size"), [(False, 32), (True, 32), (False, 128)])
def test_int4_artifact_integers_are_carried_exactly(onnx_tiny_folder: Path, tmp_path: Path, symmetric: bool,
                                                    group_size: int) -> None:
    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=group_size, symmetric=symmetric),)),
             artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")  # auto: int4, the artifact's group size
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 5 * loaded.spec.num_layers
    # no float zero points anywhere (they run on ORT's slow fp32 kernels): asymmetric groups get their
    # offsets as group sums x offset terms added after each MatMulNBits
    assert all(len(n.input) == 3 for n in nodes)
    added = [n for n in graph.node if n.name.endswith("/kiln_add_offsets")]
    assert len(added) == (0 if symmetric else len(nodes))
    # every file as readable as the marker kiln wrote (onnx wrote the weights file 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert set(modes.values()) == {modes["kiln-export.json"]}, modes
    # the fast kernels round activations to int8 (accuracy level 4); the weights are the artifact's. With
    # groups of 128 the 64-wide inputs are one padded group, whose sums must stop at the real inputs
    error = onnx_export.logit_error(loaded, folder)
    assert 0 < error < onnx_export.TOLERANCE["int4"]


def test_asymmetric_offsets_are_the_artifacts_own(onnx_tiny_folder: Path, tmp_path: Path) -> None:
    """The split (q - 8) * s + (offset + 8 s) equals q * s + offset: with the offset terms removed the
    export computes a different model, with them it matches kiln within the int8 activation rounding."""
    import onnx

    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32),)), artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")
    kept = onnx_export.logit_error(loaded, folder)
    import shutil

    from onnx import numpy_helper

    graph_model = onnx.load(str(folder / onnx_export.RUNTIME_FILE))  # with its weights
    zeroed = 0
    for init in graph_model.graph.initializer:
        if init.name.endswith("/kiln_offsets"):  # zero offset terms: the graph then computes (q - 8) * s only
            init.CopyFrom(numpy_helper.from_array(0 * numpy_helper.to_array(init), init.name))
            zeroed += 1
    assert zeroed == 5 * loaded.spec.num_layers
    changed = tmp_path / "no-offsets"
    shutil.copytree(folder, changed)
    onnx.save_model(graph_model, str(changed / onnx_export.RUNTIME_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="no-offsets.data")
    assert onnx_export.logit_error(loaded, changed) > 5 * kept


def test_integer_zero_points_run_on_matmulnbits_own_zero_points(onnx_tiny_folder: Path, tmp_path: Path) -> None:
    """Offsets -z * s with integer z need no offset terms: MatMulNBits takes z as its 4-bit zero points and
    runs its fast kernels; the export still computes the artifact's own weights (its check, and a changed z
    moves the logits)."""
    import onnx
    from onnx import numpy_helper

    from kiln.compress.quantize.qlinear import Int4Linear

    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, keep_embeddings=False,
                                                     zero_point="integer"),)), artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    layers = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * loaded.spec.num_layers + 1  # gate and up are one matrix; and the head
    assert all(onnx_export.integer_zero_points(m.offsets, m.scales) is not None for m in layers)
    folder = onnx_export.export(loaded, tmp_path / "onnx")  # its check: within the int4 tolerance of `loaded`
    graph_model = onnx.load(str(folder / onnx_export.RUNTIME_FILE))
    graph = graph_model.graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 4 for n in nodes) and len(nodes) == 5 * loaded.spec.num_layers + 1
    assert not [n for n in graph.node if "kiln_" in n.name and n.name != "/kiln/last_positions"]
    # the tied lookup reads the head's int4 rows with their zero points: no fp32 copy of the table (the
    # builder's asymmetric lookup read the dense weight, so such exports kept one)
    head = next(n for n in nodes if n.name.startswith("/lm_head/"))
    lookup = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup) == 1 and list(lookup[0].input[2:]) == list(head.input[2:4])
    assert not [i for i in graph.initializer if "embed_tokens" in i.name or i.name == "lm_head.MatMul.weight"]
    kept = onnx_export.logit_error(loaded, folder)
    assert 0 < kept < onnx_export.TOLERANCE["int4"]
    # a prompt of PREFILL_ROWS tokens or more runs on the prefill graph, whose matmuls carry the same zero points
    prompt = loaded.tokenizer.encode("The sea is calm tonight, and the tide is full; the moon lies fair upon "
                                     "the straits, where the light gleams and is gone, and the cliffs stand")
    assert len(prompt) >= PREFILL_ROWS
    model = OnnxModel(folder, loaded.spec)
    assert model.prefill_session is not None
    with torch.inference_mode():
        want = loaded.model(torch.tensor([prompt]))[0]
    got = model.extend(0, prompt, 0)[0]
    assert float((got - want).abs().max() / (want.max() - want.min())) < onnx_export.TOLERANCE["int4"]
    # the zero points are the layers' own: each row's first block in the low nibble
    down = loaded.model.layers[0].mlp.down_proj
    node = next(n for n in nodes if n.name.startswith("/model/layers.0/mlp/down_proj/"))
    packed = numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[3]))
    zeros = (-down.offsets / down.scales).round().to(torch.uint8)
    assert (torch.from_numpy(packed[:, 0] & 0x0F) == zeros[:, 0]).all()
    assert (torch.from_numpy(packed[:, 0] >> 4) == zeros[:, 1]).all()
    assert bool((zeros != 8).any())
    import shutil

    for init in graph.initializer:  # every zero point 8: the symmetric reading of the same codes
        if init.name in {n.input[3] for n in nodes}:
            init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), 0x88), init.name))
    changed = tmp_path / "zeros-8"
    shutil.copytree(folder, changed)
    onnx.save_model(graph_model, str(changed / onnx_export.RUNTIME_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="zeros-8.data")
    assert onnx_export.logit_error(loaded, changed) > 5 * kept


def test_float_offsets_are_not_taken_for_zero_points() -> None:
    scales = torch.tensor([[0.5, 0.25]])
    assert onnx_export.integer_zero_points(-torch.tensor([[3.0, 15.0]]) * scales, scales).tolist() == [[3, 15]]
    assert onnx_export.integer_zero_points(torch.tensor([[-1.3, 0.1]]), scales) is None  # Q4_1's group minimum
    assert onnx_export.integer_zero_points(-torch.tensor([[3.0, 16.0]]) * scales, scales) is None  # past 4 bits
    packed = onnx_export.pack_zero_points(torch.tensor([[1, 2, 3]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x83]]  # an odd count of blocks: the last byte's high nibble is padding


def test_int8_artifact_stays_within_tolerance(onnx_tiny_folder: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "int8"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=8),)), artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")
    # int8 MatMulNBits also rounds the activations to int8 (accuracy level 4), as llama.cpp's Q8_0 does
    assert 0 < onnx_export.logit_error(loaded, folder) < onnx_export.TOLERANCE["int8"]
    # one scale per row fits any block: the export takes the largest that divides the matmuls' inputs
    assert json.loads((folder / "kiln-export.json").read_text())["block_size"] == 64


def test_int8_block_is_the_largest_that_divides_every_input_size(tiny: LoadedModel) -> None:
    def block(hidden: int, intermediate: int) -> int:
        spec = dataclasses.replace(tiny.spec, hidden_size=hidden, intermediate_size=intermediate,
                                   num_heads=hidden // 16, num_kv_heads=1, head_dim=16)
        return onnx_export.int8_block(spec)

    assert block(576, 1536) == 64 and block(4096, 11008) == 64 and block(96, 160) == 32 and block(48, 80) == 16


def test_logits_all_matches_the_graph(tiny: LoadedModel, tiny_onnx: Path) -> None:
    folder = tiny_onnx
    ids = [1, 4, 8, 15, 16, 23, 42]
    with torch.inference_mode():
        want = tiny.model(torch.tensor([ids]), logits="all")[0]
    got = OnnxModel(folder, tiny.spec, 1)(torch.tensor([ids]), logits="all")[0]
    assert torch.allclose(got, want, atol=1e-4)


def test_export_adds_a_last_logits_graph_and_keeps_the_builders(tiny: LoadedModel, tiny_onnx: Path) -> None:
    import onnx

    folder = tiny_onnx

    def inputs(name: str) -> set[str]:
        return {i.name for i in onnx.load(str(folder / name), load_external_data=False).graph.input}

    assert onnx_export.LOGITS_TO_KEEP in inputs(onnx_export.RUNTIME_FILE)
    assert onnx_export.LOGITS_TO_KEEP not in inputs(onnx_export.ONNX_FILE)  # ORT GenAI still runs model.onnx
    assert OnnxModel(folder, tiny.spec, 1).keeps_last


def test_extend_returns_the_last_logits_and_rolls_back(tiny: LoadedModel, tiny_onnx: Path) -> None:
    folder = tiny_onnx
    model = OnnxModel(folder, tiny.spec, 1)
    ids = [1, 4, 8, 15, 16, 23, 42, 7]
    every = model.logits_all(ids)
    assert torch.allclose(model.extend(3, ids[:5], 0), every[4:5], atol=1e-5)
    assert torch.allclose(model.extend(3, ids[5:], 5, keep=3), every[5:], atol=1e-5)
    # back to position 5 with another token: the keys written at 5..7 are overwritten, not attended to
    other = model.logits_all([*ids[:5], 99])
    assert torch.allclose(model.extend(3, [99], 5), other[-1:], atol=1e-5)
    model.forget(3)
    assert 3 not in model.states


def test_one_onnx_session_can_be_its_own_draft(tiny: LoadedModel, tiny_onnx: Path) -> None:
    """The same OnnxModel as the engine's model and its draft: the draft's sequences keep ids of their own."""
    from kiln.engine.drafting import Drafter
    from kiln.engine.generate import Generator

    folder = tiny_onnx
    target = OnnxModel(folder, tiny.spec, 1)
    prompt = [1, *range(300, 320)]
    want = greedy(target, tiny, [prompt])[0]
    drafter = Drafter(target, 3, tiny.spec.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert Generator(target, tiny.tokenizer, drafter=drafter).generate([prompt], params)[0].token_ids == want
    assert drafter.stats.passes > 0 and drafter.stats.acceptance_rate == 1.0
    assert not target.states and not drafter.states  # the sequence and its draft were freed


def test_generate_cli_runs_the_onnx_runtime(onnx_tiny_folder: Path, tiny_folder: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    kiln = str(Path(sys.executable).parent / "kiln")
    env = {**os.environ, "KILN_CACHE": str(tmp_path / "cache"), "KILN_HOME": str(tmp_path / "home")}

    def run(runtime: str, *extra: str) -> dict:
        out = subprocess.run([kiln, "generate", "-m", str(onnx_tiny_folder), "--runtime", runtime, "--raw",
                              "--temperature", "0", "--max-tokens", "8", "--json", *extra, "The sea"],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    onnx_run, torch_run = run("onnxruntime"), run("torch")
    assert onnx_run["text"] == torch_run["text"] and onnx_run["completion_tokens"] == torch_run["completion_tokens"]
    assert any((tmp_path / "cache" / "onnx").glob("*/model.onnx"))  # exported once, into the cache
    # speculative decoding with the model as its own draft: the same text, every draft token kept
    drafted = run("onnxruntime", "--draft", str(onnx_tiny_folder), "--speculate", "3")
    assert drafted["text"] == onnx_run["text"] and drafted["acceptance_rate"] == 1.0
    stop = onnx_run["text"].strip()[2:4]  # a stop string ends a drafted generation as a plain one
    stopped = run("onnxruntime", "--draft", str(onnx_tiny_folder), "--stop", stop)
    assert (stopped["text"], stopped["finish_reason"]) == (onnx_run["text"][: onnx_run["text"].index(stop)], "stop")
    # under auto, a draft that onnxruntime refuses (head size 8) keeps the target on torch beside it
    auto = run("auto", "--draft", str(tiny_folder), "--speculate", "3")
    assert auto["text"] == torch_run["text"]
    refused = subprocess.run([kiln, "generate", "-m", str(onnx_tiny_folder), "--draft", str(onnx_tiny_folder),
                              "--temperature", "0.7", "The sea"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--temperature 0" in refused.stderr


def test_bf16_model_is_refused_by_the_onnx_runtime(onnx_tiny_folder: Path) -> None:
    from kiln.engine.onnx_runtime import runtime_model

    with pytest.raises(InvalidParameterError, match="drop --dtype bf16"):
        runtime_model(load(str(onnx_tiny_folder), "bf16", progress=False), "onnxruntime")


def test_a_tied_int4_head_is_shared_with_the_embedding_lookup(onnx_tiny_folder: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "int4-head"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, symmetric=True, keep_embeddings=False),)),
             artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    lookup = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup) == 1 and "lm_head.MatMul.weight_scales" in lookup[0].input
    assert not [i for i in graph.initializer if "embed_tokens" in i.name]  # no fp32 copy of the table
    # the lookup gives kiln's own rows (its tied head's int4 values): within the int4 tolerance
    assert onnx_export.logit_error(loaded, folder) < onnx_export.TOLERANCE["int4"]


def test_auto_runtime_picks_onnxruntime_where_it_takes_the_model(onnx_tiny_folder: Path, tiny_folder: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.engine import onnx_runtime
    from kiln.engine.onnx_runtime import pick_runtime

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32),)), artifact, progress=False)
    int4 = load(str(artifact), progress=False)
    model, runtime = pick_runtime(int4, "auto")
    assert runtime == "onnxruntime" and isinstance(model, OnnxModel)
    assert "building the ONNX export" in capsys.readouterr().err  # the one-time export says so
    fp32 = load(str(onnx_tiny_folder), progress=False)  # an uncompressed model runs there too
    model, runtime = pick_runtime(fp32, "auto")
    assert runtime == "onnxruntime" and isinstance(model, OnnxModel)
    # the rest stays on kiln's graph: int8 keys and values, bf16, a head size ONNX Runtime's attention
    # refuses; and an explicit --runtime is obeyed
    assert pick_runtime(int4, "auto", kv_cache="int8") == (int4.model, "torch")
    bf16 = load(str(artifact), "bf16", progress=False)
    assert pick_runtime(bf16, "auto") == (bf16.model, "torch")
    odd = tmp_path / "odd-int4"
    compress(str(tiny_folder), Recipe((Quantize(bits=4, group_size=32),)), odd, progress=False)
    odd_model = load(str(odd), progress=False)
    assert pick_runtime(odd_model, "auto") == (odd_model.model, "torch")
    assert pick_runtime(int4, "torch") == (int4.model, "torch")
    # a second copy of the weights that would not fit: torch, with one line saying why
    weights = sum(t.numel() * t.element_size() for t in fp32.model.parameters())
    monkeypatch.setattr(onnx_runtime, "available_bytes", lambda: weights)  # the copy would take all of it
    capsys.readouterr()
    assert pick_runtime(fp32, "auto") == (fp32.model, "torch")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than 50% of the memory available" in err[0]
    monkeypatch.setattr(onnx_runtime, "available_bytes", lambda: 3 * weights)
    assert pick_runtime(fp32, "auto")[1] == "onnxruntime"


def test_a_caller_that_needs_no_graph_lets_kilns_weights_go_before_the_session_loads(
        onnx_tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.engine import onnx_runtime
    from kiln.engine.onnx_runtime import pick_runtime

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    kept = load(str(onnx_tiny_folder), progress=False)
    reference, _ = pick_runtime(kept, "onnxruntime")  # builds the export, keeps kiln's weights
    assert not any(t.is_meta for t in kept.model.parameters())
    released = load(str(onnx_tiny_folder), progress=False)
    seen: list[bool] = []  # whether kiln's weights were still there as the session was built
    real = onnx_runtime.OnnxModel
    monkeypatch.setattr(onnx_runtime, "OnnxModel", lambda *a, **k: seen.append(
        any(not t.is_meta for t in released.model.parameters())) or real(*a, **k))
    model, runtime = pick_runtime(released, "auto", keep_weights=False)
    assert runtime == "onnxruntime" and seen == [False]
    assert all(t.is_meta for t in released.model.parameters())
    prompts = [[1, 5, 9, 200], [1, 7]]
    assert greedy(model, released, prompts) == greedy(reference, kept, prompts)
    # on torch the weights are the model: they stay
    fresh = load(str(onnx_tiny_folder), progress=False)
    assert pick_runtime(fresh, "torch", keep_weights=False) == (fresh.model, "torch")
    assert not any(t.is_meta for t in fresh.model.parameters())


def test_auto_runtime_falls_back_to_torch_when_the_export_fails(onnx_tiny_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.engine import onnx_runtime

    artifact = tmp_path / "int8"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=8),)), artifact, progress=False)
    loaded = load(str(artifact), progress=False)

    def refuse(*_: object) -> Path:
        raise onnx_export.OnnxExportError("the ONNX export's logits differ from the source")

    monkeypatch.setattr(onnx_runtime, "onnx_folder", refuse)
    assert onnx_runtime.pick_runtime(loaded, "auto") == (loaded.model, "torch")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logits differ" in err[0] and "running it on torch" in err[0]
    with pytest.raises(onnx_export.OnnxExportError):  # asked for by name, the failure is the user's answer
        onnx_runtime.pick_runtime(loaded, "onnxruntime")


def test_bench_and_generate_run_an_int4_artifact_on_onnxruntime_by_default(onnx_tiny_folder: Path,
                                                                        tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32),)), artifact, progress=False)
    kiln = str(Path(sys.executable).parent / "kiln")
    env = {**os.environ, "KILN_CACHE": str(tmp_path / "cache"), "KILN_HOME": str(tmp_path / "home")}
    bench = subprocess.run([kiln, "bench", "-m", str(artifact), "--batch-sizes", "1", "--prompt-tokens", "8",
                            "--new-tokens", "4", "--runs", "1", "--json"], env=env, capture_output=True, text=True,
                           check=True)
    assert json.loads(bench.stdout)["runtime"] == "onnxruntime"
    forced = subprocess.run([kiln, "bench", "-m", str(artifact), "--batch-sizes", "1", "--prompt-tokens", "8",
                             "--new-tokens", "4", "--runs", "1", "--json", "--runtime", "torch"], env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(forced.stdout)["runtime"] == "torch"

    def generate(*runtime: str) -> str:
        out = subprocess.run([kiln, "generate", "-m", str(artifact), "--raw", "--temperature", "0", "--max-tokens",
                              "6", "--json", *runtime, "The sea"], env=env, capture_output=True, text=True, check=True)
        return str(json.loads(out.stdout)["text"])

    assert generate() == generate("--runtime", "onnxruntime")  # the default ran the export bench built


def test_an_asymmetric_int4_head_keeps_its_offsets_and_its_last_position_slice(onnx_tiny_folder: Path,
                                                                                tmp_path: Path) -> None:
    import onnx

    artifact = tmp_path / "int4-head"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, keep_embeddings=False),)), artifact,
             progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")  # its check runs kiln.onnx: within tolerance
    graph = onnx.load(str(folder / onnx_export.RUNTIME_FILE), load_external_data=False).graph
    sliced = next(n for n in graph.node if n.name == "/kiln/last_positions").output[0]
    head = [n for n in graph.node if sliced in n.input]
    # the head's MatMulNBits and its group sums (a Reshape into groups, summed) both read the last positions only
    assert sorted(n.op_type for n in head) == ["MatMulNBits", "Reshape"]
    assert any(n.name.startswith("/lm_head/") and n.name.endswith("/kiln_add_offsets") for n in graph.node)
    model = OnnxModel(folder, loaded.spec)
    prompt = loaded.tokenizer.encode("The sea is")
    with torch.inference_mode():
        want = loaded.model(torch.tensor([prompt]))[0]
    got = model.extend(0, prompt, 0)[0]  # the last position's logits, through the slice
    assert got.shape == want.shape
    assert float((got - want).abs().max() / (want.max() - want.min())) < onnx_export.TOLERANCE["int4"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_an_int8_head_under_int4_layers_runs_as_8_bit_in_the_export(onnx_tiny_folder: Path, tmp_path: Path,
                                                                    symmetric: bool,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    import onnx

    from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear, QuantEmbedding

    artifact = tmp_path / "int4-head8"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, symmetric=symmetric,
                                                     keep_embeddings=False, head_bits=8),)), artifact, progress=False)
    loaded = load(str(artifact), progress=False)
    assert isinstance(loaded.model.lm_head, Int8Linear) and isinstance(loaded.model.embed, QuantEmbedding)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    folder = onnx_export.export(loaded, tmp_path / "onnx")  # its check: within the int4 tolerance
    graph = onnx.load(str(folder / onnx_export.RUNTIME_FILE), load_external_data=False).graph
    bits = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    head = [v for k, v in bits.items() if k.startswith("/lm_head/")]
    assert len(head) == 1 and head[0]["bits"] == 8 and head[0]["block_size"] == onnx_export.int8_block(loaded.spec)
    assert all(v["bits"] == 4 for k, v in bits.items() if not k.startswith("/lm_head/"))
    assert not any(n.name.startswith("/lm_head/") and n.name.endswith("/kiln_add_offsets") for n in graph.node)
    # the tied lookup reads the head's 8-bit rows, as kiln's QuantEmbedding does: no fp32 copy of the table
    lookup = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup) == 1 and {a.name: a.i for a in lookup[0].attribute}["bits"] == 8
    assert not [i for i in graph.initializer if "embed_tokens" in i.name]
    assert json.loads((folder / "kiln-export.json").read_text())["head_bits"] == 8
    error = onnx_export.logit_error(loaded, folder)
    assert 0 < error < onnx_export.TOLERANCE["int4"]
    capfd.readouterr()
    OnnxModel(folder, loaded.spec)
    assert "shape info" not in capfd.readouterr().err  # the rewired lookup left no stale shapes behind


def test_eval_generation_tasks_run_on_the_chosen_runtime(onnx_tiny_folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.evaluate.runner import EvalOptions, run

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(f'{{"prompt": "{p}", "reference": "the sea"}}\n'
                            for p in ("The sea", "Tell me about boats.", "One, two, three")))
    tiny = load(str(onnx_tiny_folder), progress=False)

    def outputs(runtime: str) -> tuple[list[str], str]:
        outcome = run(tiny, EvalOptions(task=f"gen:{data}", max_new_tokens=8, runtime=runtime), progress=False)
        return [r["output"] for r in outcome.records], outcome.settings["runtime"]

    on_torch, on_onnx = outputs("torch"), outputs("onnxruntime")
    assert all(on_torch[0]) and on_onnx == (on_torch[0], "onnxruntime") and on_torch[1] == "torch"
    assert outputs("auto")[1] == "onnxruntime"  # as kiln serve would run this fp32 model
    # `kiln eval` lets kiln's weights go before the session loads, with the same outputs
    released = run(tiny, EvalOptions(task=f"gen:{data}", max_new_tokens=8, runtime="auto"), progress=False,
                   keep_weights=False)
    assert [r["output"] for r in released.records] == on_onnx[0]
    assert all(t.is_meta for t in tiny.model.parameters())
    with pytest.raises(InvalidParameterError, match="applies to generation tasks"):
        EvalOptions(task="wikitext2", runtime="onnxruntime")


def test_a_server_runs_each_model_on_its_own_runtime(onnx_tiny_folder: Path, tiny_folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --runtime auto an int4 artifact loaded first runs on onnxruntime (and its torch tensors are
    released), and a model that ONNX Runtime's attention refuses (head size 8), loaded after it, on torch;
    each engine thread has its own torch thread count (one beside ONNX Runtime)."""
    import asyncio

    from kiln.engine import threads
    from kiln.serve import deploy

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(threads, "PROCESS_THREADS", 3)  # a count no default sets, so the check can fail
    loading_threads: list[int] = []  # torch's count on the thread that loads each model
    real_load = deploy.load

    def counting_load(*args: Any, **kwargs: Any) -> LoadedModel:
        loading_threads.append(torch.get_num_threads())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(deploy, "load", counting_load)
    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, symmetric=True),)), artifact,
             progress=False)
    router = deploy.Router(EngineConfig(kv_budget_bytes=8 << 20), "fp32", runtime="auto")
    try:
        router.add_static(str(artifact))
        router.add_static(str(tiny_folder))
        int4, fp32 = router.routes[str(artifact)].live, router.routes[str(tiny_folder)].live
        assert (int4.runtime, fp32.runtime) == ("onnxruntime", "torch")
        assert isinstance(int4.worker.engine.model, OnnxModel) and fp32.worker.engine.model is fp32.loaded.model
        # the session holds the artifact's weights, so the server let kiln's copy go (its warm-up ran after)
        assert all(t.is_meta for t in (*int4.loaded.model.parameters(), *int4.loaded.model.buffers()))
        assert not any(t.is_meta for t in fp32.loaded.model.parameters())

        def counts() -> tuple[int, int]:
            async def ask() -> tuple[int, int]:
                return (await int4.worker.call(lambda e: torch.get_num_threads()),
                        await fp32.worker.call(lambda e: torch.get_num_threads()))
            return asyncio.run(ask())

        assert counts() == (1, 3)
        assert loading_threads == [3, 3]  # the fp32 model loads with every thread, after the ORT one
    finally:
        for route in router.routes.values():
            route.live.worker.stop()


def test_auto_runtime_weighs_one_copy_when_kilns_weights_go_and_the_export_is_built(
        onnx_tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.benchmark import latency
    from kiln.engine import onnx_runtime
    from kiln.engine.onnx_runtime import onnx_folder, pick_runtime

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    # 600 MB of weights, 1000 MB available: two copies would not fit in half of it, one copy in half of
    # the 1600 MB there once kiln's weights go does
    monkeypatch.setattr(latency, "model_bytes", lambda _: 600 << 20)
    monkeypatch.setattr(onnx_runtime, "available_bytes", lambda: 1000 << 20)
    unbuilt = load(str(onnx_tiny_folder), progress=False)
    # no export yet: building it reads kiln's weights, so both copies count, released or not
    assert pick_runtime(unbuilt, "auto", keep_weights=False) == (unbuilt.model, "torch")
    assert "more than 50% of the memory available (1000 MB)" in capsys.readouterr().err
    assert not any(t.is_meta for t in unbuilt.model.parameters())
    onnx_folder(load(str(onnx_tiny_folder), progress=False))  # now the export is cached
    kept = load(str(onnx_tiny_folder), progress=False)
    assert pick_runtime(kept, "auto") == (kept.model, "torch")  # kiln's graph stays: two copies
    released = load(str(onnx_tiny_folder), progress=False)
    model, runtime = pick_runtime(released, "auto", keep_weights=False)
    assert runtime == "onnxruntime" and isinstance(model, OnnxModel)
    assert all(t.is_meta for t in released.model.parameters())
    # one copy that would not fit even then: torch, saying so
    monkeypatch.setattr(onnx_runtime, "available_bytes", lambda: 500 << 20)
    capsys.readouterr()
    late = load(str(onnx_tiny_folder), progress=False)
    assert pick_runtime(late, "auto", keep_weights=False) == (late.model, "torch")
    err = capsys.readouterr().err
    assert "more than 50% of the memory available once kiln's own copy is released (1100 MB)" in err


def test_int4_prompts_run_on_a_prefill_graph_of_widened_blocks(onnx_tiny_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    artifact = tmp_path / "int4"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=4, group_size=32, symmetric=True),)), artifact,
             progress=False)
    loaded = load(str(artifact), progress=False)
    folder = onnx_export.export(loaded, tmp_path / "onnx")

    def kinds(name: str) -> set[tuple[str, int, int]]:  # (layer or head, bits, accuracy level) of the MatMulNBits
        graph = onnx.load(str(folder / name), load_external_data=False).graph
        return {("head" if n.name.startswith("/lm_head/") else "layer",
                 *(next(a.i for a in n.attribute if a.name == key) for key in ("bits", "accuracy_level")))
                for n in graph.node if n.op_type == "MatMulNBits"}

    assert kinds(onnx_export.RUNTIME_FILE) == {("layer", 4, 4)}  # the head stays fp32 here
    assert kinds(onnx_export.PREFILL_FILE) == {("layer", 8, 4)}
    model = OnnxModel(folder, loaded.spec, 1)
    assert model.prefill_session is not None
    # the widened blocks, in a data file of their own: a byte per weight, each tensor page-aligned
    layers = [n for n in onnx.load(str(folder / onnx_export.PREFILL_FILE), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits"]
    weights = sum(next(a.i for a in n.attribute if a.name == "N") * next(a.i for a in n.attribute if a.name == "K")
                  for n in layers)
    assert weights <= (folder / onnx_export.PREFILL_DATA).stat().st_size < weights + 4096 * len(layers)
    ids = torch.randint(3, loaded.spec.vocab_size, (40,)).tolist()  # PREFILL_ROWS or more: the prefill graph
    with torch.inference_mode():
        want = loaded.model(torch.tensor([ids]))[0]
    on_prefill = model.extend(1, ids, 0).clone()
    model.forget(1)
    prefill, model.prefill_session = model.prefill_session, None
    on_decode_graph = model.extend(1, ids, 0).clone()
    model.forget(1)
    # the same weights and the same int8 rounding of the activations: as close to kiln's own arithmetic as the
    # decode graph (a widening one step off, + 121, does not get this far: the export's check refuses it)
    span = float(want.max() - want.min())
    assert (on_prefill - want).abs().max() < 0.03 * span and (on_decode_graph - want).abs().max() < 0.03 * span
    assert (on_prefill - on_decode_graph).abs().max() < 0.03 * span
    # whole prompts on the prefill graph (two of one width in one run), decode steps on the other, rows
    # batched or alone: the same tokens
    class Counted:  # the prefill session, counting its runs
        runs = 0

        def __getattr__(self, name: str) -> Any:
            if name.startswith("run"):
                Counted.runs += 1
            return getattr(prefill, name)

    model.prefill_session = Counted()
    prompts = [ids, ids[::-1], ids[:33], [5, 6, 7]]
    together = greedy(model, loaded, prompts, max_batch_tokens=128)
    assert Counted.runs == 2  # the two 40-token prompts in one run, the 33-token one alone
    assert together == [greedy(model, loaded, [p], max_batch_tokens=128)[0] for p in prompts]
    monkeypatch.setenv("KILN_ORT_PREFILL", "0")
    assert OnnxModel(folder, loaded.spec, 1).prefill_session is None


def test_int8_exports_have_no_prefill_graph(onnx_tiny_folder: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "int8"
    compress(str(onnx_tiny_folder), Recipe((Quantize(bits=8),)), artifact, progress=False)
    folder = onnx_export.export(load(str(artifact), progress=False), tmp_path / "onnx")
    assert not (folder / onnx_export.PREFILL_FILE).exists()  # its blocks are 8-bit already
    assert not (folder / onnx_export.PREFILL_DATA).exists()


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_prompt_logprobs_come_from_the_prefill_chunk_by_chunk(tiny: LoadedModel, tiny_onnx: Path,
                                                               runtime: str) -> None:
    """echo with logprobs: each prompt token's log-probability given those before it, read from the prefill's
    own logits over chunks of 16 while another request decodes, and equal to one pass over the whole prompt;
    the prompt is computed whole, even when an earlier request left it in the prefix cache."""
    model: Any = tiny.model if runtime == "torch" else OnnxModel(
        tiny_onnx, tiny.spec, 1)
    prompt = [1, *range(500, 539)]  # 40 tokens: three chunks
    with torch.inference_mode():
        reference = torch.log_softmax(tiny.model(torch.tensor([prompt]), logits="all")[0].float(), dim=-1)
    engine = Engine(model, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20, max_batch_tokens=16))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = engine.add_request(prompt, greedy)
    engine.run()  # its prompt is now in the prefix cache
    other = engine.add_request([1, 7, 8], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    engine.step()
    scored = engine.add_request(prompt, dataclasses.replace(greedy, prompt_logprobs=2))
    engine.run()
    assert scored.cached_tokens == 0 and scored.output == first.output and other.status.finished
    values = scored.prompt_logprobs
    assert values[0] is None and [v.token for v in values[1:]] == prompt[1:]  # type: ignore[union-attr]
    want = reference[range(len(prompt) - 1), prompt[1:]]
    assert torch.allclose(torch.tensor([v.logprob for v in values[1:]]), want, atol=1e-4)  # type: ignore[union-attr]
    best = reference[:-1].topk(2, dim=-1)
    assert [[t for t, _ in v.top] for v in values[1:]] == best.indices.tolist()  # type: ignore[union-attr]


def test_the_engine_drafts_on_the_onnx_runtime_with_the_same_tokens(tiny: LoadedModel, default_model: LoadedModel,
                                                                    tiny_onnx: Path) -> None:
    """An ONNX Runtime target checks k drafts in one run over its own buffers and drops the rejected keys;
    the draft is a second session over the same export (every proposal kept) or kiln's graph of another model
    with the same vocabulary (the default one: most proposals rejected)."""
    from kiln.engine.drafting import Drafter

    folder = tiny_onnx
    onnx = OnnxModel(folder, tiny.spec, 1)
    other = default_model.model
    prompts = [[1, *range(300, 320)], [1, 5, 6, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=0)

    def run(drafter: Drafter | None) -> list[Any]:
        engine = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20), drafter)  # type: ignore[arg-type]
        first = engine.add_request(prompts[0], params)
        for _ in range(8):
            engine.step()  # alone: drafted
        second = engine.add_request(prompts[1], params)  # then batched, then alone again
        engine.run()
        assert not onnx.states and not onnx.lengths and (drafter is None or not drafter.states)
        return [first, second]

    want = run(None)
    for draft in (OnnxModel(folder, tiny.spec, 1), other):
        drafter = Drafter(draft, 4, tiny.spec.vocab_size)
        got = run(drafter)
        for w, g in zip(want, got, strict=True):
            assert g.output == w.output
            assert [v.logprob for v in g.logprobs] == pytest.approx([v.logprob for v in w.logprobs], abs=1e-4)
        assert drafter.stats.passes > 0
        assert (drafter.stats.accepted == drafter.stats.proposed) == (draft is not other)


def test_int8_keys_and_values_on_onnxruntime_by_name_are_refused() -> None:
    # the session keeps its own keys and values: --kv-cache int8 was dropped without a word (and bench reported it)
    from types import SimpleNamespace

    from kiln.engine.onnx_runtime import pick_runtime

    with pytest.raises(InvalidParameterError, match="--kv-cache int8 .* pass --runtime torch"):
        pick_runtime(SimpleNamespace(), "onnxruntime", kv_cache="int8")  # type: ignore[arg-type]


def test_a_cache_that_cannot_be_made_is_refused_before_the_build(default_model: LoadedModel, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the build ran its half minute and more, then failed to write, pointing at -o (which `generate` has not)
    from kiln.engine import onnx_runtime

    def no_build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the export was built")

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("KILN_CACHE", str(cache))
    monkeypatch.setattr(onnx_export, "export", no_build)
    with pytest.raises(InvalidParameterError, match=f"cannot make the ONNX export cache {cache}/onnx .*KILN_CACHE"):
        onnx_runtime.onnx_folder(default_model)


def test_a_model_folder_holding_another_tools_model_onnx_runs_kilns_own_export(
        onnx_tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a Hugging Face folder that ships a model.onnx was run from that file: another graph, other weights
    import shutil

    from kiln.engine.onnx_runtime import runtime_model

    folder = tmp_path / "hf"
    shutil.copytree(onnx_tiny_folder, folder)
    (folder / "model.onnx").write_text("another tool's graph")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    loaded = load(str(folder), progress=False)
    model = runtime_model(loaded, "onnxruntime")
    assert isinstance(model, OnnxModel) and model.folder.is_relative_to(tmp_path / "cache" / "onnx")
    assert greedy(model, loaded, [[1, 2, 3]]) == greedy(loaded.model, loaded, [[1, 2, 3]])


@pytest.mark.parametrize("damage", ["truncated", "changed in place", "marker lists no files",
                                    "built with another onnxruntime"])
def test_a_cached_export_that_is_not_whole_is_built_again(tiny: LoadedModel, tiny_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    # a truncated weights file stopped ONNX Runtime with a traceback; bytes changed in place ran silently
    import os
    import shutil

    from kiln.engine import onnx_runtime
    from kiln.model.source import ONNX_EXPORT_MARKER

    shutil.copytree(tiny_cache, tmp_path / "cache")  # the export as onnx_folder built it, whole
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    folder = onnx_runtime.export_path(tiny)
    assert onnx_runtime.has_export(tiny)
    data = folder / "model.onnx.data"
    if damage == "truncated":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "changed in place":
        with data.open("r+b") as f:
            f.seek(data.stat().st_size // 2)
            f.write(bytes(4096))
    else:
        marker = json.loads((folder / ONNX_EXPORT_MARKER).read_text())
        if damage == "marker lists no files":
            del marker[onnx_export.FILES_KEY]
        else:  # a graph built for one ONNX Runtime need not load in another
            assert marker[onnx_export.RUNTIME_KEY] == onnx_export.runtime_versions()
            marker[onnx_export.RUNTIME_KEY]["onnxruntime"] = "1.0.0"
        (folder / ONNX_EXPORT_MARKER).write_text(json.dumps(marker))
        if damage != "marker lists no files":
            genai = marker[onnx_export.RUNTIME_KEY]["onnxruntime-genai"]
            assert f"it was built with onnxruntime 1.0.0, onnxruntime-genai {genai}" in str(
                onnx_export.export_problem(folder))
    assert not onnx_runtime.has_export(tiny)
    builds: list[Path] = []
    build = onnx_export.export

    def counted(loaded: LoadedModel, out: Path, *args: Any, **kwargs: Any) -> Path:
        builds.append(out)
        return build(loaded, out, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export", counted)
    assert onnx_runtime.onnx_folder(tiny) == folder and builds == [folder]
    assert onnx_runtime.onnx_folder(tiny) == folder and builds == [folder]  # whole again: not built a third time
    assert greedy(OnnxModel(folder, tiny.spec), tiny, [[1, 2, 3]]) == greedy(tiny.model, tiny, [[1, 2, 3]])


def test_w8a8_layers_are_refused_before_the_build(onnx_tiny_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the builder re-quantized their dequantized weights as weight-only int8: other arithmetic, which failed
    # the logit check only after the whole build, with no word of why
    import subprocess

    from kiln.compress.quantize.qlinear import W8A8Linear

    def no_build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the builder ran")

    loaded = load(str(onnx_tiny_folder), progress=False)
    mlp = loaded.model.layers[0].mlp
    mlp.down_proj = W8A8Linear.from_float(mlp.down_proj)
    monkeypatch.setattr(subprocess, "run", no_build)
    with pytest.raises(InvalidParameterError, match="no form for W8A8 layers.*--runtime torch.*--quantize int8"):
        onnx_export.export(loaded, tmp_path / "onnx")


def test_two_builds_of_one_cached_export_at_once_make_it_once(tiny: LoadedModel, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # both built it, and the second replaced the folder the first was loading (or failed on its non-empty target)
    import threading
    import time

    from kiln.engine import onnx_runtime

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    builds: list[Path] = []
    build = onnx_export.export

    def slow(loaded: LoadedModel, out: Path, *args: Any, **kwargs: Any) -> Path:
        builds.append(out)
        time.sleep(1)  # long enough for the other caller to arrive while this one builds
        return build(loaded, out, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export", slow)
    found: list[Path] = []
    callers = [threading.Thread(target=lambda: found.append(onnx_runtime.onnx_folder(tiny))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1 and found == builds * 2 and onnx_runtime.has_export(tiny)


def test_an_edited_config_beside_the_same_weights_gets_its_own_cached_export(
        onnx_tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the cache was named by the weights alone: the export built with the old epsilon ran on
    import shutil

    from kiln.engine import onnx_runtime

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hf"
    shutil.copytree(onnx_tiny_folder, folder)
    before = onnx_runtime.export_path(load(str(folder), progress=False))
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    edited = load(str(folder), progress=False)
    assert edited.spec.rms_norm_eps == 1e-3 and onnx_runtime.export_path(edited) != before


def test_a_prompt_whose_publishing_was_interrupted_is_not_served_from_the_prefix_cache(
        tiny: LoadedModel, tiny_onnx: Path) -> None:
    # its blocks stayed findable with nothing in the store: every later prompt with the same start (each turn of a
    # kiln chat after a Ctrl-C) failed with "the ONNX runtime lost a sequence's keys and values"
    folder = tiny_onnx
    onnx = OnnxModel(folder, tiny.spec, 1)
    prompt = [1, *range(400, 439)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    reference = greedy(onnx, tiny, [prompt])[0][:4]
    engine = Engine(onnx, tiny.tokenizer, EngineConfig(kv_budget_bytes=8 << 20))  # type: ignore[arg-type]
    publish = onnx.publish

    def ctrl_c(*args: Any) -> None:
        onnx.publish = publish  # type: ignore[method-assign]
        raise KeyboardInterrupt

    onnx.publish = ctrl_c  # type: ignore[method-assign]
    first = engine.add_request(prompt, params)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.abort(first.request_id) and engine.cache.used_blocks == 0
    again = engine.add_request(prompt, params)
    engine.run()
    assert again.output == reference and again.cached_tokens == 0


def test_a_graph_onnx_runtime_cannot_load_is_refused_in_one_line(tiny: LoadedModel, tiny_onnx: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a graph written for a newer ONNX Runtime stopped the load with ONNX Runtime's own traceback
    import shutil

    import onnx

    from kiln.engine import onnx_runtime
    from kiln.errors import ModelFormatError

    folder = Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))
    graph = onnx.load(str(folder / onnx_export.RUNTIME_FILE), load_external_data=False)
    graph.ir_version = 99  # an IR version no ONNX Runtime reads yet
    onnx.save_model(graph, str(folder / onnx_export.RUNTIME_FILE))
    with pytest.raises(ModelFormatError, match=rf"ONNX Runtime \S+ cannot load {folder / 'kiln.onnx'} \(.+\); "
                                               rf"delete {folder} to build the export again, or pass --runtime torch"
                       ) as caught:
        OnnxModel(folder, tiny.spec)
    # ONNX Runtime's reason, without its error code and the C++ location and signature it carries
    assert "failed: Unsupported model IR version: 99" in str(caught.value)
    said = str(caught.value)
    assert "\n" not in said and "ONNXRuntimeError" not in said and ".cc:" not in said

    # `--runtime auto` falls back to kiln's graph while it still holds the weights, not once they are gone
    artifact = tmp_path / "int8"
    compress(str(tiny.folder), Recipe((Quantize(bits=8),)), artifact, progress=False)
    monkeypatch.setattr(onnx_runtime, "onnx_folder", lambda *_: folder)
    kept = load(str(artifact), progress=False)
    assert onnx_runtime.pick_runtime(kept, "auto") == (kept.model, "torch")
    released = load(str(artifact), progress=False)
    with pytest.raises(ModelFormatError, match="cannot load"):
        onnx_runtime.pick_runtime(released, "auto", keep_weights=False)
    assert released.weights_released and not kept.weights_released
