"""Reduced-precision copies of a decoder for faster batch-1 generation on a CPU.

Why this exists: at batch 1 every decoding step is a chain of matrix-vector products, each reading its
whole weight matrix once for one multiply-add per weight. The cores finish the arithmetic long
before memory delivers the bytes, so tokens/s is about memory bandwidth / weight bytes per token, and
the only lever left once the code is lean is fewer bytes per weight:

* ``"int8"``: every Linear layer (the LM head included) holds int8 weights with one scale per output
  row — a quarter of fp32's bytes — and runs on fbgemm's dynamic int8 GEMM, which quantises each
  input on the fly; embeddings, LayerNorms, attention and the KV cache stay fp32. No calibration
  data is needed. This is the fast path: ~3x fp32 at batch 1 on an AVX-512-VNNI CPU.
* ``"bf16"``: every parameter and activation in bfloat16 — half the bytes. Kept as the simple
  alternative, but torch's bf16 matrix-vector kernels reach a lower fraction of the bandwidth than
  its fp32 ones on this hardware, so it gains far less than 2x. ``torch.autocast`` is not used at
  all: it keeps the fp32 weights and casts them on every call, reading more bytes than fp32 does.

The source model is left untouched; the copy is for inference only (no gradients through int8).
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal, get_args

import torch
from torch import nn

from .transformer import Decoder

Precision = Literal["bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

__all__ = ["PRECISIONS", "Int8Linear", "Precision", "quantize_decoder", "weight_bytes_per_token"]


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times one fp32 scale per row (symmetric, per channel).

    The product is fbgemm's dynamic int8 GEMM (`torch.ops.quantized.linear_dynamic`): each call
    quantises its input to 8 bits with a range measured on that input, multiplies int8 by int8 into
    int32 with AVX-512 VNNI, and rescales to fp32. The packed int8 matrix is the only copy of the
    weight a forward pass reads. torch's weight-only kernel (`_weight_int8pack_mm`, which keeps the
    activations in floating point) was measured too: ~8 GB/s of int8 weights at batch 1 against
    ~17-20 GB/s for fbgemm on this CPU, i.e. too slow to be worth its smaller error.

    `weight` (int8) and `scale` are kept as buffers so the state dict describes the layer exactly;
    the packed form is derived from them.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        bias = linear.bias.detach().float().contiguous() if linear.bias is not None else None
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed = _pack(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: with VNNI the int8 products accumulate in int32 without the 16-bit
        # saturation that 7-bit activations guard against on older CPUs, so keep all 8 bits.
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, False)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 flags quantized tensors as deprecated (in favour of torchao, not installed
        # here); this one is only the input of fbgemm's packing routine and is dropped at once.
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def quantize_decoder(model: Decoder, precision: Precision) -> Decoder:
    """A reduced-precision copy of `model` for inference (eval mode); `model` itself is not changed."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = copy.deepcopy(model).eval().requires_grad_(False)
    if precision == "bf16":
        out.to(torch.bfloat16)
        with torch.no_grad():
            for module in out.modules():
                if isinstance(module, nn.Linear):
                    # Row-major [out, in]: the layout torch's bf16 matrix-vector kernels read fastest
                    # (unlike fp32, see Decoder.use_decoding_layout, which leaves bf16 alone).
                    module.weight.data = module.weight.data.contiguous()
        return out
    out.float()
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return out


def weight_bytes_per_token(model: Decoder) -> int:
    """Bytes of weights one batch-1 decoding step reads.

    Every block's tensors (Linear weights and biases, LayerNorms) and the final norm are read once
    per step, the LM head once — for a tied head that is the token-embedding matrix, counted once —
    and of the two embedding tables only the one row that the new token and its position select.
    Buffers count like parameters because a quantised Linear keeps its int8 weight as a buffer.
    KV-cache reads are not weights and are left out.
    """
    cfg = model.config
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for part in (*model.blocks, model.norm, model.lm_head):
        if part is None:
            continue
        for t in (*part.parameters(), *part.buffers()):
            add(t)
    for table in (model.embed.token.weight, model.embed.position.weight):
        if id(table) not in seen:  # an untied table: one row per step
            total += cfg.d_model * table.element_size()
    return total
