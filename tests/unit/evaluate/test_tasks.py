"""Task resolution and the item loaders: formats of the harness, counts of the shared data, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import settings
from kiln.errors import DataFormatError, DataNotFoundError, InvalidParameterError
from kiln.evaluate.tasks import generation, multiple_choice, resolve

DATA = settings.data_dir()
needs_data = pytest.mark.skipif(not (DATA / "SOURCES.md").is_file(),
                                reason=f"shared data not found at {DATA}; set KILN_DATA_DIR")


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(InvalidParameterError, match="unknown task 'mmlu'.*hellaswag.*mc:FILE.jsonl"):
        resolve("mmlu")


def test_prefixed_tasks_carry_their_file() -> None:
    ref = resolve("mc:~/items.jsonl")
    assert ref.kind == "multiple_choice" and ref.path == Path("~/items.jsonl").expanduser()
    assert resolve("gen:x.jsonl").kind == "generation"


@needs_data
@pytest.mark.parametrize("name,count", [("hellaswag", 10042), ("arc_easy", 2376), ("arc_challenge", 1172),
                                        ("piqa", 1838)])
def test_builtin_counts(name: str, count: int) -> None:
    assert sum(1 for _ in multiple_choice.load(name)) == count


@needs_data
def test_arc_format_and_numeric_labels() -> None:
    items = list(multiple_choice.load("arc_easy"))
    first = items[0]
    assert first.context.startswith("Question: ") and first.context.endswith("\nAnswer:")
    assert first.delimiter == " " and 0 <= first.gold < len(first.choices)
    assert {len(it.choices) for it in items} == {3, 4, 5}


@needs_data
def test_hellaswag_is_preprocessed() -> None:
    item = next(multiple_choice.load("hellaswag"))
    assert len(item.choices) == 4 and "[" not in item.context and "  " not in item.context


def test_hellaswag_preprocess_matches_the_harness() -> None:
    assert multiple_choice.hellaswag_preprocess(" How to x [title] Step one [step] now  ok ") == \
        "How to x. Step one now ok"


@needs_data
def test_piqa_and_squad() -> None:
    piqa = next(multiple_choice.load("piqa"))
    assert piqa.context.startswith("Question: ") and len(piqa.choices) == 2
    squad = list(generation.squad())
    assert len(squad) == 10570 and squad[0].references and squad[0].messages[-1]["role"] == "user"


def test_missing_data_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"piqa/valid.jsonl not found under .* --data DIR or .*KILN_DATA_DIR"):
        list(multiple_choice.load("piqa", data_dir=tmp_path))


def test_custom_file_items_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "ok.jsonl"
    good.write_text('{"context": "2+2=", "choices": ["4", "5"], "gold": 0}\n\n'
                    '{"context": "", "choices": ["a", "b", "c"], "gold": 2}\n')
    items = list(multiple_choice.custom(good))
    assert [it.gold for it in items] == [0, 2] and items[0].delimiter == ""
    cases = {
        '{"context": "x", "choices": ["a", "b"], "gold": 0}\nnot json\n': r"bad.jsonl:2: not valid JSON",
        '{"context": "x", "choices": ["a", "b"]}\n': r"bad.jsonl:1: missing field 'gold'",
        '{"context": "x", "choices": ["a", "b"], "gold": 5}\n': r"bad.jsonl:1: gold 5",
        '{"context": "x", "choices": ["a"], "gold": 0}\n': r"bad.jsonl:1: 'choices' must be",
        '[1, 2]\n': r"bad.jsonl:1: expected a JSON object",
    }
    for text, pattern in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(DataFormatError, match=pattern):
            list(multiple_choice.custom(bad))


def test_custom_generation_file(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "Say hi", "reference": "hi"}\n{"prompt": "Two", "reference": ["2", "two"]}\n')
    items = list(generation.custom(path))
    assert items[1].references == ["2", "two"]
    path.write_text('{"prompt": "Say hi", "reference": 3}\n')
    with pytest.raises(DataFormatError, match="gen.jsonl:1"):
        list(generation.custom(path))


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    # a UnicodeDecodeError traceback before; a Latin-1 file is a common mistake
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"context": "x", "choices": ["a", "b"], "gold": 0}\n'
                     b'{"context": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not UTF-8 text .*; save the file as UTF-8"):
        list(multiple_choice.custom(path))


def test_a_calibration_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    from kiln.compress import calibration
    from kiln.compress.recipe import Calibration

    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataFormatError, match=r"weights.bin: not UTF-8 text .*; save the file as UTF-8"):
        calibration.load(Calibration(file=str(path)), tokenizer=None)  # type: ignore[arg-type]


def test_a_byte_order_mark_opens_a_task_file(tmp_path: Path) -> None:
    # files saved by some Windows editors begin with one: the first item was refused as "not valid JSON"
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"context": "Sky:", "choices": [" blue", " red"], "gold": 0}\n')
    assert [item.choices for item in multiple_choice.custom(path)] == [[" blue", " red"]]
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "Hi", "reference": "Hello"}\n')
    assert [item.references for item in generation.custom(path)] == [["Hello"]]


def test_a_choice_written_twice_is_refused(tmp_path: Path) -> None:
    # the tie went to the first copy: an item whose gold was the second copy was scored wrong every time
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "Pick:", "choices": [" a", " b", " a"], "gold": 2}\n')
    with pytest.raises(DataFormatError, match=r"items.jsonl:1: 'choices' holds ' a' more than once; keep one copy"):
        list(multiple_choice.custom(path))


def test_a_folder_given_as_the_task_file_is_named_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=rf"data file {tmp_path} is a folder; pass the .jsonl file"):
        list(multiple_choice.custom(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"does not exist; check the path"):
        list(generation.custom(tmp_path / "missing.jsonl"))
