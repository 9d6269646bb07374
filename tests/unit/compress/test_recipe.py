"""Recipes are validated before any work; errors name the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compress.recipe import Distill, LowRank, Prune, Quantize, Recipe, RecipeError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_full_recipe_round_trips(tmp_path: Path) -> None:
    recipe = Recipe.from_toml(write(tmp_path, """
[calibration]
samples = 16
tokens = 128

[[step]]
kind = "prune"
method = "wanda"
sparsity = 0.5

[[step]]
kind = "quantize"
bits = 4
method = "gptq"
group_size = 64
symmetric = true
"""))
    assert isinstance(recipe.steps[0], Prune) and isinstance(recipe.steps[1], Quantize)
    assert recipe.steps[1].group_size == 64 and recipe.calibration.samples == 16
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text,message", [
    ('[[step]]\nkind = "quantize"\nbits = 3', r"step 1 \(quantize\): bits = 3 is not allowed; use one of 8, 4"),
    ('[[step]]\nkind = "quantize"\nbits = 4\ngroup_size = 100', r"group_size = 100 .* 32, 64, 128"),
    ('[[step]]\nkind = "quantize"\nmethod = "hqq"', r"method = 'hqq' .* 'rtn', 'gptq', 'awq', 'smoothquant'"),
    ('[[step]]\nkind = "prune"\nsparsity = 1.5', r"sparsity = 1.5 is not allowed; use a number in \[0.0, 0.95\]"),
    ('[calibration]\nsamples = 0\n[[step]]\nkind = "quantize"', r"samples = 0 is not allowed; use an integer in \[1, "),
    ('[[step]]\nkind = "shrink"', r"kind = 'shrink' .* 'quantize', 'prune', 'lowrank', 'distill'"),
    ('[[step]]\nkind = "quantize"\nbitz = 4', r"unknown field 'bitz'; the fields are"),
    ('[[step]]\nkind = "lowrank"', r"set exactly one of rank or energy"),
    ('[[step]]\nkind = "quantize"\n[[step]]\nkind = "prune"', r"quantize must be the one last step"),
    ('[[step]]\nkind = "quantize"\nbits = 4\nmethod = "smoothquant"', r"set bits = 8"),
    ('[[step]]\nkind = "quantize"\nmethod = "gptq"\ntarget = "block"', r"target = 'block' .* 'layer', 'model'"),
    ('[[step]]\nkind = "quantize"\nmethod = "gptq"\nrefit = 11', r"refit = 11 .* \[0, 10\]"),
    ('[[step]]\nkind = "quantize"\nbits = 4\nzero_point = "int"',
     r"step 1 \(quantize\): zero_point = 'int' is not allowed; use one of 'float', 'integer'"),
    ('[[step]]\nkind = "quantize"\nbits = 4\nkeep_embeddings = false\nhead_bits = 4',
     r"head_bits = 4 is not allowed; use one of 0, 8"),
    ('[[step]]\nkind = "quantize"\nbits = 4\nhead_bits = 8', r"head_bits = 8 .* set keep_embeddings = false"),
    ("", r"no steps"),
    ('[[step]]\nkind = "prune"\n[[steps]]\nkind = "quantize"', r"both \[\[step\]\] and \[\[steps\]\] tables"),
    ("[[step]\n", r"not valid TOML"),
])
def test_bad_recipes_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(write(tmp_path, text))


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_toml(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="is a folder; pass a TOML file"):
        Recipe.from_toml(tmp_path)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    # a UTF-16 or Latin-1 file was a UnicodeDecodeError traceback
    path = tmp_path / "recipe.toml"
    path.write_bytes('[[step]]\nkind = "quantize"  # café\n'.encode("utf-16"))
    with pytest.raises(RecipeError, match=r"cannot be read as UTF-8 text .*; save it as UTF-8 TOML"):
        Recipe.from_toml(path)



def test_steps_in_code() -> None:
    recipe = Recipe((Distill(steps=10), Prune(sparsity=0.5), LowRank(energy=0.9)))
    assert [type(s).__name__ for s in recipe.steps] == ["Distill", "Prune", "LowRank"]


@pytest.mark.parametrize("later", [Quantize(bits=8), Prune(sparsity=0.5), Distill(steps=1)])
def test_nothing_but_lowrank_follows_a_factorisation(later: Quantize | Prune | Distill) -> None:
    # each of these reached the factorised layers after the SVDs and ended in a traceback
    with pytest.raises(RecipeError, match=r"step 1 \(lowrank\) is followed by \w+, which cannot read factorised"):
        Recipe((LowRank(rank=8), later))
    assert Recipe((LowRank(rank=8), LowRank(rank=8, targets=("attn",)))).steps[1].targets == ("attn",)


def test_lowrank_and_quantize_flags_are_refused_before_the_load() -> None:
    from kiln.cli import _recipe_from_flags, build_parser

    args = build_parser().parse_args(["compress", "--lowrank-rank", "8", "--quantize", "int8", "-o", "out"])
    with pytest.raises(RecipeError, match="followed by quantize"):
        _recipe_from_flags(args)


@pytest.mark.parametrize("flags,keep,head_bits", [
    ([], True, 0),
    (["--quantize-embeddings"], False, 0),
    (["--quantize-embeddings", "int8"], False, 8),
])
def test_embedding_flags_make_the_recipe(flags: list[str], keep: bool, head_bits: int) -> None:
    from kiln.cli import _recipe_from_flags, build_parser

    args = build_parser().parse_args(["compress", "--quantize", "int4", *flags, "-o", "out"])
    step = _recipe_from_flags(args).steps[0]
    assert (step.keep_embeddings, step.head_bits, step.bits) == (keep, head_bits, 4)


@pytest.mark.parametrize("text,message", [
    ('[[step]]\nkind = "quantize"\nsymmetric = "yes"', r"step 1: symmetric = 'yes' is not allowed; use true or false"),
    ('[[step]]\nkind = "quantize"\nkeep_embeddings = 1', r"keep_embeddings = 1 .* true or false"),
    ('[[step]]\nkind = "distill"\ntime_budget_s = "x"', r"time_budget_s = 'x' .* a number"),
    # an empty list ended, after the load, in "no layer gets smaller at that rank or energy; lower it"
    ('[[step]]\nkind = "lowrank"\nrank = 8\ntargets = []', r"targets = \[\] chooses no layer"),
    # nothing generates text for a student yet: the run trained on the calibration file under a manifest saying
    # generated
    ('[[step]]\nkind = "distill"\ndata = "generated"', r"data = 'generated' is not allowed; use one of 'calibration'"),
    ('[[step]]\nkind = "lowrank"\nrank = 8\ntargets = "mlp"', r"targets = 'mlp' .* a list of strings"),
    ('[calibration]\nseed = "x"\n[[step]]\nkind = "quantize"', r"\[calibration\]: seed = 'x' .* an integer"),
    ('[calibration]\nfile = 3\n[[step]]\nkind = "quantize"', r"\[calibration\]: file = 3 .* a string"),
    ('calibration = 3\n[[step]]\nkind = "quantize"', r"\[calibration\] must be a table"),
])
def test_values_of_the_wrong_type_are_named(tmp_path: Path, text: str, message: str) -> None:
    # these once reached the work: a traceback after the model loaded, or "yes" taken as true
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(write(tmp_path, text))


@pytest.mark.parametrize("budget", [0, -5.0, float("inf")])
def test_a_time_budget_must_leave_time_to_train(budget: float) -> None:
    # a budget of 0 or less wrote an untrained student as a finished distillation, exit 0; inf went into the
    # manifest as Infinity, which is not JSON
    with pytest.raises(RecipeError, match=rf"time_budget_s = {budget} is not allowed; use a number of seconds above 0"):
        Recipe((Distill(time_budget_s=budget),))


STEP = '[[artifact.step]]\nkind = "quantize"\n'


@pytest.mark.parametrize("text,message", [
    ("artifact = 3\n", r"expected \[\[artifact\]\] tables"),
    (f'[[artifact]]\nname = 5\n{STEP}', r"name = 5 .* a folder name"),
    (f'[[artifact]]\nname = "../up"\n{STEP}', r"name = '../up' .* a folder name"),
    (f'[[artifact]]\nname = "/tmp/elsewhere"\n{STEP}', r"name = '/tmp/elsewhere' .* a folder name"),
    (f'[[artifact]]\nname = ".."\n{STEP}', r"name = '..' .* a folder name"),
    (f'[[artifact]]\nname = "a"\n{STEP}[[artifact]]\nname = "a"\n{STEP}', r"two artifacts are named 'a'"),
    (f'sample = 4\n[[artifact]]\nname = "a"\n{STEP}', r"unknown table 'sample'; a sweep holds \[\[artifact\]\]"),
])
def test_bad_sweeps_are_named(tmp_path: Path, text: str, message: str) -> None:
    # each once wrote outside -o, overwrote the artifact before it, was ignored, or ended in a traceback
    from kiln.compress.recipe import read_sweep

    with pytest.raises(RecipeError, match=message):
        read_sweep(write(tmp_path, text))


def test_sweep_names_its_recipes(tmp_path: Path) -> None:
    from kiln.compress.recipe import read_sweep

    sweep = read_sweep(write(tmp_path, f'[[artifact]]\nname = "int8"\n{STEP}[[artifact]]\nname = "int4"\n'
                                       '[[artifact.step]]\nkind = "quantize"\nbits = 4\n'))
    assert [(name, recipe.steps[0].bits) for name, recipe in sweep] == [("int8", 8), ("int4", 4)]


@pytest.mark.parametrize("extra", [
    ["--quantize", "int8"],
    ["--prune", "0.5"],
    ["--calibration-samples", "4"],
    ["--sweep", "sweep.toml"],
    ["--method", "gptq"],
    ["--group-size", "32"],
])
def test_a_recipe_file_takes_no_step_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           extra: list[str]) -> None:
    # the flags were ignored: --calibration-samples 4 ran the recipe's 128 samples
    from kiln.cli import main

    recipe = write(tmp_path, '[[step]]\nkind = "quantize"\nbits = 4\nmethod = "gptq"')
    assert main(["compress", "--recipe", str(recipe), *extra, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{extra[0]} does not apply with --recipe" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,says", [
    (["--quantize", "w8a8", "--method", "gptq"], "--method applies with --quantize int8 or int4"),  # made SmoothQuant
    (["--quantize", "int8", "--group-size", "32"], "--group-size applies with --quantize int4"),  # per channel
    (["--quantize", "int8", "--symmetric"], "--symmetric applies with --quantize int4"),
    (["--quantize", "int8", "--zero-point", "integer"], "--zero-point applies with --quantize int4, asymmetric"),
    (["--quantize", "int4", "--symmetric", "--zero-point", "integer"], "--zero-point applies with --quantize int4, "
     "asymmetric (no --symmetric)"),  # a symmetric grid's zero point is 8
    (["--quantize", "int4", "--alpha", "0.8"], "--alpha applies with --quantize w8a8"),
    (["--quantize", "int4", "--gptq-refit", "0"], "--gptq-refit applies with --method gptq"),
    (["--quantize", "int4", "--target", "layer"], "--target applies with --method gptq or awq"),  # RTN aims at nothing
    (["--prune", "0.5", "--quantize-embeddings"], "--quantize-embeddings applies with --quantize"),
    (["--quantize", "int8", "--prune-method", "wanda"], "--prune-method applies with --prune"),  # no pruning at all
])
def test_a_step_option_no_step_reads_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                flags: list[str], says: str) -> None:
    # each was ignored without a word, and the artifact was not the one asked for
    from kiln.cli import main

    assert main(["compress", *flags, "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and not (tmp_path / "out").exists()


def test_step_options_left_out_take_the_steps_defaults() -> None:
    from kiln.cli import _recipe_from_flags, build_parser

    def recipe(*flags: str) -> Recipe:
        return _recipe_from_flags(build_parser().parse_args(["compress", *flags, "-o", "out"]))

    assert recipe("--quantize", "int4").steps == (Quantize(bits=4),)
    assert recipe("--quantize", "w8a8").steps == (Quantize(bits=8, method="smoothquant"),)
    assert recipe("--prune", "0.5").steps[0].method == "magnitude"
    gptq = recipe("--quantize", "int4", "--method", "gptq", "--group-size", "32", "--symmetric", "--gptq-refit", "0",
                  "--gptq-target", "layer").steps[0]
    assert gptq == Quantize(bits=4, method="gptq", group_size=32, symmetric=True, refit=0, target="layer")
    assert recipe("--quantize", "int4", "--method", "awq", "--target", "layer").steps == (
        Quantize(bits=4, method="awq", target="layer"),)
    integer = recipe("--quantize", "int4", "--zero-point", "integer").steps[0]
    assert integer == Quantize(bits=4, zero_point="integer") and integer.integer_zero


def test_integer_zero_points_are_read_at_four_bits_asymmetric(tmp_path: Path) -> None:
    recipe = Recipe.from_toml(write(tmp_path, '[[step]]\nkind = "quantize"\nbits = 4\nmethod = "gptq"\n'
                                              'zero_point = "integer"\n'))
    step = recipe.steps[0]
    assert isinstance(step, Quantize) and step.zero_point == "integer" and step.integer_zero
    assert Recipe.from_dict(recipe.to_dict()) == recipe and recipe.to_dict()["steps"][0]["zero_point"] == "integer"
    # the default reads back from a manifest at any bits, as the other grid fields do
    assert Recipe.from_dict(Recipe((Quantize(bits=8),)).to_dict()).steps[0] == Quantize(bits=8)
    assert not Quantize(bits=4, symmetric=True, zero_point="integer").integer_zero


def test_a_missing_calibration_file_is_refused_before_the_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the magnitude pruning before GPTQ ran in full, and the missing file was found only when GPTQ asked for it
    from kiln.compress import pipeline
    from kiln.errors import DataNotFoundError

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the calibration file was looked for")

    monkeypatch.setattr(pipeline, "load", no_load)
    recipe = Recipe((Prune(sparsity=0.5, method="magnitude"), Quantize(bits=4, method="gptq")))
    with pytest.raises(DataNotFoundError, match="wiki.valid.raw not found under"):
        pipeline.compress("default", recipe, tmp_path / "out", data_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match="not found under"):
        pipeline.distill_to_artifact("default", Distill(steps=1), tmp_path / "student", data_dir=tmp_path)
    # steps that read no calibration text need no file
    assert not any(pipeline.reads_calibration(s) for s in (Quantize(bits=8), Prune(sparsity=0.5, method="magnitude"),
                                                           Prune(sparsity=0.5, method="2:4", score="magnitude"),
                                                           LowRank(rank=8)))
    assert all(pipeline.reads_calibration(s) for s in (Quantize(bits=4, method="awq"),
                                                       Prune(sparsity=0.5, method="wanda"),
                                                       LowRank(rank=8, recover_steps=2), Distill(steps=1)))


@pytest.mark.parametrize("later", [Distill(steps=1), LowRank(rank=8, recover_steps=5)])
def test_unstructured_pruning_before_a_training_step_is_refused(later: Distill | LowRank) -> None:
    # the training updated every weight and filled the zeros back in; the manifest still said sparse
    with pytest.raises(RecipeError, match=r"step 1 \(prune wanda\) comes before step 2 .* put the prune step after"):
        Recipe((Prune(sparsity=0.5, method="wanda"), later))
    if isinstance(later, Distill):  # nothing follows a factorisation (test_nothing_but_lowrank_follows_a_factorisation)
        Recipe((later, Prune(sparsity=0.5, method="wanda")))
    Recipe((Prune(sparsity=0.5, method="heads"), later))  # structured pruning shrinks shapes; training keeps them
    Recipe((Prune(sparsity=0.5), LowRank(rank=8)))  # no training


@pytest.mark.parametrize("step", [Distill(steps=1), LowRank(rank=8, recover_steps=1), Quantize(bits=4, method="gptq")])
def test_the_test_split_is_refused_before_the_load_for_every_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    step: Distill | LowRank | Quantize) -> None:
    # distillation trained on wiki.test.raw without a word, and GPTQ refused it only after the load
    from kiln.compress import pipeline
    from kiln.compress.recipe import Calibration
    from kiln.errors import InvalidParameterError

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the calibration file was checked")

    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("some text " * 100)
    monkeypatch.setattr(pipeline, "load", no_load)
    recipe = Recipe((step,), Calibration(file="wikitext-2-raw/wiki.test.raw"))
    with pytest.raises(InvalidParameterError, match="wiki.test.raw is a test split; calibrate on wiki.valid.raw"):
        pipeline.compress("default", recipe, tmp_path / "out", data_dir=tmp_path)


@pytest.mark.parametrize("steps,tokens", [
    ((Prune(sparsity=0.5, method="magnitude"), Quantize(bits=4, method="gptq")), 32),
    ((Prune(sparsity=0.5, method="heads"), Distill(steps=1, seq_len=32)), 8),
])
def test_a_calibration_text_too_short_is_refused_before_the_first_step(
        tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: tuple, tokens: int) -> None:
    # the pruning (or a distillation of minutes) ran in full before the step that reads the text refused it
    from kiln.compress import pipeline
    from kiln.compress.recipe import Calibration
    from kiln.errors import InvalidParameterError

    def ran(*_: object) -> None:
        raise AssertionError("a step ran before the calibration text was checked")

    monkeypatch.setattr(pipeline, "prune", ran)
    text = tmp_path / "short.txt"
    text.write_text("a few words only")
    recipe = Recipe(steps, Calibration(file=str(text), samples=2, tokens=tokens))
    with pytest.raises(InvalidParameterError, match=r"short.txt has \d+ tokens"):
        pipeline.compress(str(tiny_folder), recipe, tmp_path / "out", progress=False)


@pytest.mark.parametrize("step,message", [
    (Quantize(bits=8, method="gptq"), r"calibration: tokens = 128 is longer than the model's context of 64 tokens"),
    (Distill(steps=1, seq_len=128), r"distill: seq_len = 128 is longer than the model's context of 64 tokens"),
])
def test_windows_past_the_models_context_are_refused(tiny_folder: Path, tmp_path: Path, step: Quantize | Distill,
                                                      message: str) -> None:
    # both ended in an IndexError from the rotary table once the model ran
    from kiln.compress import pipeline
    from kiln.compress.recipe import Calibration
    from kiln.errors import InvalidParameterError

    text = tmp_path / "calib.txt"
    text.write_text("plenty of words to sample from. " * 400)
    recipe = Recipe((step,), Calibration(file=str(text), samples=2, tokens=128))
    with pytest.raises(InvalidParameterError, match=message):
        pipeline.compress(str(tiny_folder), recipe, tmp_path / "out", progress=False)


def test_lowrank_recovery_trains_within_a_short_context(tiny_folder: Path, tmp_path: Path) -> None:
    # its fixed 256-token windows ran past a 64-token context: an IndexError after the SVDs
    from kiln.compress import pipeline
    from kiln.compress.recipe import Calibration

    text = tmp_path / "calib.txt"
    text.write_text("plenty of words to sample from. " * 400)
    recipe = Recipe((LowRank(rank=2, recover_steps=1),), Calibration(file=str(text)))
    manifest = pipeline.compress(str(tiny_folder), recipe, tmp_path / "out", progress=False)
    assert manifest.history["lowrank_recovery"]["steps"] == 1


def test_structured_pruning_records_what_went(tiny_folder: Path, tmp_path: Path) -> None:
    # only `layers` recorded its dropped layers: an artifact pruned by heads or channels did not say which
    from kiln.compress import pipeline
    from kiln.compress.recipe import Calibration
    from kiln.model.load import load

    text = tmp_path / "calib.txt"
    text.write_text("plenty of words to sample from. " * 400)
    calibration = Calibration(file=str(text), samples=2, tokens=32)
    heads = pipeline.compress(str(tiny_folder), Recipe((Prune(sparsity=0.5, method="heads"),), calibration),
                              tmp_path / "heads", progress=False)
    dropped = heads.history["pruned_heads"]  # 4 query heads over 2 KV heads: one of each pair, per layer
    assert len(dropped) == 2 and all(len(layer) == 2 and layer[0] in (0, 1) and layer[1] in (2, 3)
                                     for layer in dropped)
    assert load(str(tmp_path / "heads"), progress=False).spec.num_heads == 2
    channels = pipeline.compress(str(tiny_folder), Recipe((Prune(sparsity=0.25, method="channels"),),
                                                          calibration), tmp_path / "channels", progress=False)
    assert channels.history["pruned_channels"] == {"kept": 48, "of": 64}


@pytest.mark.parametrize("text,message", [
    ('kind = "prune"\nmethod = "2:4"\nsparsity = 0.7', r"\(prune\): sparsity = 0.7 is not read by method = '2:4'"),
    ('kind = "prune"\nmethod = "wanda"\nscore = "magnitude"', r"score = 'magnitude' is not read by method = 'wanda'"),
    ('kind = "quantize"\nbits = 8\ngroup_size = 32', r"group_size = 32 is not read at bits = 8"),
    ('kind = "quantize"\nbits = 8\nsymmetric = true', r"symmetric = True is not read at bits = 8"),
    ('kind = "quantize"\nbits = 8\nzero_point = "integer"', r"zero_point = 'integer' is not read at bits = 8"),
    ('kind = "quantize"\nbits = 4\nsymmetric = true\nzero_point = "integer"',
     r"zero_point = 'integer' is not read with symmetric = true .*; leave zero_point out"),
    ('kind = "quantize"\nbits = 4\nalpha = 0.8', r"alpha = 0.8 is not read by method = 'rtn' \(it is SmoothQuant's\)"),
    ('kind = "quantize"\nbits=4\nmethod="awq"\nrefit=1', r"refit = 1 is not read by method = 'awq' \(it is GPTQ's\)"),
    ('kind = "quantize"\nbits=4\nmethod="awq"\ntarget="layer"\ndamp=0.05',
     r"damp = 0.05 is not read by method = 'awq' with target = 'layer'"),
    ('kind = "quantize"\nbits=4\ntarget="layer"',
     r"target = 'layer' is not read by method = 'rtn' \(it is GPTQ's and AWQ's\)"),
])
def test_a_field_the_step_does_not_read_is_refused(tmp_path: Path, text: str, message: str) -> None:
    # each was ignored without a word: 2:4 pruned half, int8 stayed per channel, AWQ ran as it always does
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(write(tmp_path, f"[[step]]\n{text}\n"))


def test_awq_reads_damp(tmp_path: Path) -> None:
    # its first layers' least-squares aim at the uncompressed model is damped as GPTQ's is
    recipe = Recipe.from_toml(write(tmp_path, '[[step]]\nkind = "quantize"\nbits = 4\nmethod = "awq"\ndamp = 0.05\n'))
    assert recipe.steps[0] == Quantize(bits=4, method="awq", damp=0.05)
    assert "damp" in Quantize(bits=4, method="rtn").ignored()


def test_a_recipe_copied_from_a_manifest_reads_back() -> None:
    # every field is written out, at its default where the step does not read it
    recipe = Recipe((Prune(method="2:4", score="magnitude"), Quantize(bits=8, method="smoothquant", alpha=0.7)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("method", ["magnitude", "wanda", "heads", "channels", "layers"])
def test_a_sparsity_that_removes_nothing_is_refused(tmp_path: Path, method: str) -> None:
    text = f'[[step]]\nkind = "prune"\nmethod = "{method}"\nsparsity = 0.0'
    with pytest.raises(RecipeError, match=rf"step 1 \(prune\): sparsity = 0.0 removes nothing by method = "
                                          rf"'{method}'; use a number in \(0.0, 0.95\]"):
        Recipe.from_toml(write(tmp_path, text))
    Recipe((Prune(sparsity=0.0, method="2:4"),))  # 2:4 removes half whatever sparsity says


def test_the_prune_flag_at_zero_is_refused_before_the_load() -> None:
    from kiln.cli import _recipe_from_flags, build_parser

    args = build_parser().parse_args(["compress", "--prune", "0.0", "-o", "out"])
    with pytest.raises(RecipeError, match=r"sparsity = 0.0 removes nothing by method = 'magnitude'"):
        _recipe_from_flags(args)


def test_prune_flag_with_two_four_must_be_half() -> None:
    from kiln.cli import _recipe_from_flags, build_parser

    args = build_parser().parse_args(["compress", "--prune", "0.7", "--prune-method", "2:4", "-o", "out"])
    with pytest.raises(RecipeError, match=r"--prune 0.7 does not apply with --prune-method 2:4, .*; pass --prune 0.5"):
        _recipe_from_flags(args)


@pytest.mark.parametrize("flags", [["--quantize", "int8"], ["--prune", "0.5"], ["--lowrank-rank", "8"]])
def test_calibration_samples_without_a_step_that_reads_them_is_refused(flags: list[str]) -> None:
    # RTN, magnitude pruning and plain low rank read no text: the flag was taken and recorded, and changed nothing
    from kiln.cli import _recipe_from_flags, build_parser

    args = build_parser().parse_args(["compress", *flags, "--calibration-samples", "4", "-o", "out"])
    with pytest.raises(RecipeError, match=r"--calibration-samples applies with a step that reads calibration text"):
        _recipe_from_flags(args)
    args = build_parser().parse_args(["compress", "--quantize", "w8a8", "--calibration-samples", "4", "-o", "out"])
    assert _recipe_from_flags(args).calibration.samples == 4


def test_an_artifact_made_from_an_artifact_records_how_that_one_was_made(tiny_folder: Path, tmp_path: Path) -> None:
    # the int8 manifest of a pruned artifact told of the int8 step alone: the pruning was in no manifest it carried
    from kiln.compress import pipeline

    pruned = pipeline.compress(str(tiny_folder), Recipe((Prune(sparsity=0.5),)), tmp_path / "pruned", progress=False)
    manifest = pipeline.compress(str(tmp_path / "pruned"), Recipe((Quantize(bits=8),)), tmp_path / "int8",
                                 progress=False)
    assert manifest.source["kind"] == "artifact"
    assert manifest.source["made_from"] == {"source": pruned.source, "recipe": pruned.recipe,
                                            "calibration": pruned.calibration}
    assert manifest.source["made_from"]["recipe"]["steps"][0]["kind"] == "prune"
    assert "made_from" not in pruned.source


@pytest.mark.parametrize("name", ["", "folder"])
def test_a_calibration_file_that_is_a_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     name: str) -> None:
    # it was said not to exist; file = "" named the current folder
    from kiln.compress import calibration
    from kiln.errors import DataNotFoundError

    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"calibration file \S+ is a folder; pass a text file inside it"):
        calibration.locate(name)
    with pytest.raises(DataNotFoundError, match="is a folder"):
        calibration.locate(str(tmp_path / "folder"))
