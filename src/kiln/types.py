"""Value types shared by two or more areas of kiln."""

from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
FinishReason = Literal["stop", "length"]

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
