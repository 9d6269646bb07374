"""Calibration data: N samples of L tokens from a text file (default WikiText-2 *validation*, never test).

Samples start at seeded random offsets in the tokenized file; the file's sha256 and the settings are
recorded in the artifact's manifest so a compression can be reproduced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kiln.compress.recipe import Calibration
from kiln.errors import DataNotFoundError, InvalidParameterError
from kiln.evaluate.data import data_file, read_text
from kiln.model.source import sha256_file
from kiln.model.tokenizer import Tokenizer


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # [samples, length] token ids
    path: Path
    sha256: str
    settings: Calibration

    def describe(self) -> dict[str, object]:
        return {"file": str(self.path), "sha256": self.sha256, "samples": self.settings.samples,
                "tokens": self.settings.tokens, "seed": self.settings.seed}

    def batches(self, size: int) -> list[torch.Tensor]:
        return list(self.tokens.split(size))


def locate(file: str, data_dir: Path | None = None) -> Path:
    """The calibration file's path; a test split is refused here, for every step that reads it: distillation
    (which streams the whole file) trained on WikiText-2's test text, the text `kiln eval` scores, without a word."""
    path = Path(file).expanduser()
    if "wiki.test" in path.name:
        raise InvalidParameterError(f"calibration file {path.name} is a test split; calibrate on wiki.valid.raw "
                                    "or other text the evaluation does not use")
    if path.is_absolute() or path.exists():
        if path.is_dir():  # "does not exist" sent the user looking for a typo (file = "" is the current folder)
            raise DataNotFoundError(f"calibration file {path} is a folder; pass a text file inside it")
        if not path.is_file():
            raise DataNotFoundError(f"calibration file {path} does not exist; pass an existing text file")
        return path
    return data_file(file, data_dir)


def stream(settings: Calibration, tokenizer: Tokenizer, data_dir: Path | None = None) -> tuple[Tensor, Path, str]:
    """The whole calibration file as one token stream (for distillation), with its path and sha256."""
    path = locate(settings.file, data_dir)
    text = read_text(path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids), path, sha256_file(path)


def load(settings: Calibration, tokenizer: Tokenizer, data_dir: Path | None = None) -> CalibrationSet:
    path = locate(settings.file, data_dir)
    text = read_text(path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < settings.tokens + 1:
        raise InvalidParameterError(
            f"calibration file {path} has {len(ids)} tokens, fewer than one sample of {settings.tokens}"
        )
    rng = random.Random(settings.seed)
    starts = [rng.randrange(0, len(ids) - settings.tokens) for _ in range(settings.samples)]
    tokens = torch.tensor([ids[s : s + settings.tokens] for s in starts])
    return CalibrationSet(tokens, path, sha256_file(path), settings)
