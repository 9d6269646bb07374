"""bf16 linear layers whose weights oneDNN has reordered once, for inference.

torch's plain bf16 `F.linear` on CPU hands oneDNN a row-major weight, which oneDNN reorders into its
blocked (AMX / AVX-512 BF16) layout on every call: at the engine's shapes that reordering is about half
of each matmul's time. Reordering once at load and calling oneDNN's linear on the packed weight (the
same two operators torch's own compiler emits for frozen CPU graphs) is about twice as fast at decode
sizes. The products are the same bf16 products accumulated in fp32; only the order of accumulation may
differ from the unpacked call, so outputs agree to bf16 rounding, not bit for bit. The packed weight is
opaque (no autograd, no state_dict round trip), so this is applied only to models loaded for inference,
never to ones being compressed or trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PACK_BATCH_HINT = 16  # oneDNN's expected rows per call; measured speed is flat across 1..256 here


def can_pack(dtype: torch.dtype) -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 or AMX); elsewhere packing only costs."""
    return (
        dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.weight_nbytes = weight.numel() * weight.element_size()  # for memory accounting
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def pack_linears(model: nn.Module) -> int:
    """Replace every plain bf16 nn.Linear in `model` by a PackedLinear; returns how many were packed.

    Quantized and pruned layers (other classes) are left alone. A head tied to the embedding gets its
    own packed copy, since the embedding lookup still needs the row-major matrix.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight.dtype):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of the weights held packed (they are neither parameters nor buffers)."""
    return sum(m.weight_nbytes for m in model.modules() if isinstance(m, PackedLinear))
