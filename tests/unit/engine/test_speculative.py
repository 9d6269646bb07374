"""Speculative decoding: the target's greedy output whatever the draft proposes, on either runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine.drafting import Drafter, load_drafter
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.generate import Generator
from kiln.engine.request import Request
from kiln.engine.sampler import SamplingParams
from kiln.engine.speculative import skip_layers_draft
from kiln.errors import InvalidParameterError, KilnError, ModelFormatError, ModelNotFoundError
from kiln.model.load import LoadedModel

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def prompts(model: LoadedModel) -> list[list[int]]:
    return [model.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}]),
            model.tokenizer.encode("The history of the printing press begins")]


@pytest.fixture(scope="module")
def plain(default_model: LoadedModel) -> list[list[int]]:
    gen = Generator(default_model.model, default_model.tokenizer, prefix_caching=False)
    return [out.token_ids for out in gen.generate(prompts(default_model), GREEDY)]


def test_generate_with_a_draft_gives_the_targets_greedy_tokens(default_model: LoadedModel,
                                                               plain: list[list[int]]) -> None:
    """kiln generate --draft: the Generator's engine drafts each prompt as it decodes alone."""
    target, tok = default_model.model, default_model.tokenizer
    # five middle layers skipped: it agrees on about a quarter of its tokens, so both paths are exercised
    weak = Drafter(skip_layers_draft(target, [i for i in range(30) if i not in (10, 12, 14, 16, 18)]), 4,
                   default_model.spec.vocab_size)
    gen = Generator(target, tok, prefix_caching=False, drafter=weak)
    assert [gen.generate([p], GREEDY)[0].token_ids for p in prompts(default_model)] == plain
    assert 0 < weak.stats.accepted < weak.stats.proposed  # some kept, some rejected
    itself = Drafter(target, 3, default_model.spec.vocab_size)  # the target as its own draft keeps everything
    out = Generator(target, tok, drafter=itself).generate([prompts(default_model)[0]], GREEDY)[0]
    assert out.token_ids == plain[0] and itself.stats.acceptance_rate == 1.0
    assert itself.stats.passes < len(out.token_ids) / 3  # k + 1 tokens per pass, less the end


def test_eos_and_max_tokens_end_a_drafted_generation(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0.0, max_tokens=60)
    want = Generator(default_model.model, tok).generate([prompt], params)[0]
    drafter = Drafter(skip_layers_draft(default_model.model, list(range(15))), 4, default_model.spec.vocab_size)
    gen = Generator(default_model.model, tok, drafter=drafter)
    got = gen.generate([prompt], params)[0]
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "stop")
    short = gen.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert (short.token_ids, short.finish_reason) == (want.token_ids[:3], "length")
    assert drafter.stats.passes > 0


# --- inside the engine (kiln serve --draft) ------------------------------------------------------------


def run_engine(model: LoadedModel, drafter: Drafter | None, arrivals: list[tuple[int, list[int], SamplingParams]],
               budget: int = 64 << 20) -> list[Request]:
    """Requests added at their step numbers; run to the end."""
    engine = Engine(model.model, model.tokenizer, EngineConfig(kv_budget_bytes=budget, max_batch_tokens=64),
                    drafter)
    requests: list[Request] = []
    step = 0
    while len(requests) < len(arrivals) or engine.has_work:
        requests += [engine.add_request(p, sp) for at, p, sp in arrivals if at == step]
        engine.step()
        step += 1
    assert engine.cache.used_blocks == 0 and (drafter is None or not drafter.states)
    return requests


def test_the_engine_drafts_while_one_sequence_decodes_alone_and_gives_the_same_tokens(
        default_model: LoadedModel) -> None:
    """Alone at first, then batched with later arrivals (no drafting), then alone again (the draft catches up);
    ends by EOS, a stop string and max_tokens; logprobs are the target's."""
    tok = default_model.tokenizer
    ask = [tok.encode_chat([{"role": "user", "content": q}]) for q in
           ("Name three rivers in Europe.", "What is the capital of France?", "Write a haiku about snow.")]
    arrivals = [(0, ask[0], SamplingParams(temperature=0.0, max_tokens=60, logprobs=1)),
                (12, ask[1], SamplingParams(temperature=0.0, max_tokens=30)),
                (14, ask[2], SamplingParams(temperature=0.0, max_tokens=25, stop=("\n",))),
                (70, prompts(default_model)[1], SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True))]
    want = run_engine(default_model, None, arrivals)
    draft = skip_layers_draft(default_model.model, [i for i in range(30) if i not in (10, 12, 14, 16, 18)])
    drafter = Drafter(draft, 4, default_model.spec.vocab_size)
    got = run_engine(default_model, drafter, arrivals)
    for w, g in zip(want, got, strict=True):
        assert (g.output, g.text, g.finish_reason) == (w.output, w.text, w.finish_reason)
        assert [v.token for v in g.logprobs] == [v.token for v in w.logprobs]
        assert [v.logprob for v in g.logprobs] == pytest.approx([v.logprob for v in w.logprobs], abs=1e-4)
    assert {r.finish_reason for r in got} == {"stop", "length"}
    stats = drafter.stats
    assert stats.passes > 0 and 0 < stats.accepted < stats.proposed


def test_a_sampled_request_is_not_drafted_and_preemption_loses_nothing(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}])
    drafter = Drafter(default_model.model, 3, default_model.spec.vocab_size)  # the target as its own draft
    sampled = run_engine(default_model, drafter, [(0, prompt, SamplingParams(temperature=0.8, seed=1,
                                                                             max_tokens=20))])
    assert drafter.stats.passes == 0
    assert sampled[0].output == run_engine(default_model, None, [(0, prompt, SamplingParams(
        temperature=0.8, seed=1, max_tokens=20))])[0].output
    per_block = 16 * default_model.spec.kv_bytes_per_token(4)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    arrivals = [(i, p, greedy) for i, p in enumerate(prompts(default_model))]
    want = run_engine(default_model, None, arrivals)
    got = run_engine(default_model, drafter, arrivals, budget=6 * per_block)
    assert [r.output for r in got] == [r.output for r in want]
    assert sum(r.num_preemptions for r in got) > 0 and drafter.stats.accepted == drafter.stats.proposed > 0


def test_a_draft_with_another_vocabulary_or_no_tokens_to_propose_is_refused(default_model: LoadedModel) -> None:
    from types import SimpleNamespace

    other = SimpleNamespace(spec=SimpleNamespace(vocab_size=32000))
    with pytest.raises(InvalidParameterError, match="the draft model must share the target's tokenizer"):
        Drafter(other, 4, default_model.spec.vocab_size)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="--speculate 0 must be at least 1"):
        Drafter(default_model.model, 0, default_model.spec.vocab_size)


def test_a_draft_with_a_shorter_context_stops_drafting_at_its_end(default_model: LoadedModel,
                                                                   tiny_folder: Path) -> None:
    """A draft whose context (64 positions) ends before the target's drafts up to its end, then the target
    decodes alone: the step must not fail, and the tokens are the target's."""
    from kiln.model.load import load

    short = load(str(tiny_folder), progress=False)
    assert short.spec.max_position < default_model.spec.max_position
    tok = default_model.tokenizer
    arrivals = [(0, tok.encode_chat([{"role": "user", "content": "Count from 1 to 20 separated by commas."}]),
                 SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
                (60, [1, *range(300, 370)], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    assert len(arrivals[0][1]) < short.spec.max_position < len(arrivals[0][1]) + 40
    want = run_engine(default_model, None, arrivals)
    drafter = Drafter(short.model, 4, default_model.spec.vocab_size)
    got = run_engine(default_model, drafter, arrivals)
    assert [r.output for r in got] == [r.output for r in want]
    assert drafter.stats.passes > 0


def test_blocks_reserved_for_rejected_drafts_go_back(default_model: LoadedModel) -> None:
    """A speculative step reserves room for k drafts; once the target rejects them, the sequence holds only
    the blocks its tokens and the next one need, as it would without a draft."""
    tok = default_model.tokenizer
    draft = skip_layers_draft(default_model.model, [0, 1])  # a poor draft: most proposals rejected
    drafter = Drafter(draft, 6, default_model.spec.vocab_size)
    engine = Engine(default_model.model, tok, EngineConfig(kv_budget_bytes=64 << 20), drafter)
    r = engine.add_request(tok.encode_chat([{"role": "user", "content": "Count from 1 to 20 separated by commas."}]),
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    while engine.has_work:
        engine.step()
        if not r.status.finished:
            assert len(engine.cache.seqs[r.seq_id].blocks) == -(-(r.num_computed + 1) // 16)
    assert drafter.stats.accepted < drafter.stats.proposed and engine.cache.used_blocks == 0


@pytest.mark.parametrize("make", ["missing", "not_gguf", "no_config"])
def test_a_draft_that_fails_to_load_is_named_as_the_draft(tmp_path: Path, make: str) -> None:
    """The loader's message fits -m as well; kiln generate/serve --draft say it is the draft that failed."""
    source = tmp_path / "draft"
    if make == "not_gguf":
        source.write_text("not a model")
    elif make == "no_config":
        source.mkdir()
    with pytest.raises(KilnError) as info:
        load_drafter(str(source), 4, 49152, "torch", "fp32")
    assert type(info.value) is (ModelNotFoundError if make == "missing" else ModelFormatError)
    assert str(info.value).startswith("the draft model (--draft) failed to load: ")
    assert str(source) in str(info.value)


def test_an_empty_draft_is_refused_not_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    # --draft "" (an unset shell variable) was falsy: the command ran without drafting and without a word
    from kiln import cli

    assert cli.main(["generate", "--draft", "", "--temperature", "0", "--max-tokens", "2", "hi"]) == 2
    assert capsys.readouterr().err.strip() == ("kiln: error: the draft model (--draft) failed to load: the model "
                                               "name is empty; pass a .gguf file, a Hugging Face folder, or 'default'")


def test_a_draft_with_an_int8_kv_cache_is_refused(default_model: LoadedModel,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # `kiln generate` refused the pair; `kiln serve --draft M --kv-cache int8` drafted, and its greedy replies
    # differed from plain decoding's
    from kiln import cli

    drafter = Drafter(default_model.model, 2, default_model.spec.vocab_size)
    with pytest.raises(InvalidParameterError, match="--draft does not run with --kv-cache int8"):
        Engine(default_model.model, default_model.tokenizer, EngineConfig(kv_cache="int8"), drafter=drafter)
    assert cli.main(["serve", "--draft", "default", "--kv-cache", "int8", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--draft does not run with --kv-cache int8" in err
