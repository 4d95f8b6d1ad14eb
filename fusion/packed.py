"""The batched step's base projections through weights packed once for oneDNN, on CPU.

Why: with several rows a step's matmuls are no longer matrix-vector products, and MKL's
`sgemm` on a plain (out, in) weight re-packs the weight on every call. oneDNN reads a weight
laid out once for its kernels. Measured on one core of the 2-core x86_64 host (AVX-512,
float32), a (1536 x 576) projection: 0.25 ms for 8 rows through `F.linear`, 0.16 ms packed;
the (49152 x 576) output layer: 22-27 ms for 8 rows, 9-12 ms packed; a whole 8-row decode step
of the embedded model 136 -> 88 ms. A single token (a matrix-vector product) gains nothing
(0.07 ms either way, and a one-row LoRA-Flow step was no faster), so it keeps `F.linear`. The
results agree with `F.linear` to float32 rounding (a different order of the sums): about
1e-4 on outputs of magnitude ~25.

The price is one packed copy of every projection the step reads (the model's linear weights
again: ~540 MB for SmolLM2-135M in float32), made on first use.
Weights a merge swaps in (`runtime.merged_into` marks them with the weight they replace) are
not packed: they live for one merge, and packing them would add ~0.3 s to every switch. A
prompt read under a merge goes through the original weights' packed copies instead, the
fusion's deltas beside them (`linear(..., original=True)`); decoding a merged fusion reads
its merged weights through `F.linear` (a single token gains nothing from packing), as
does everything when packing is off: on other devices, without oneDNN, for weights that are
not float32 (other CPU dtypes are not measured), above `MAX_PACKED_BYTES`, or with
LORA_STUDIO_PACKED_WEIGHTS=0.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .limits import int_env
from .runtime import MERGED_WEIGHT

MAX_PACKED_BYTES = 4 << 30  # one packed copy of the weights, at most
MIN_ROWS = 2  # one token is a matrix-vector product: MKL's is as fast (see above)


class PackedWeights:
    """Packed copies of one model's weights, keyed by the weight tensor; an entry is made on
    first use and is valid while that tensor is unmodified (its version counter unchanged)."""

    def __init__(self, model):
        self.enabled = _can_pack(model)
        self._entries: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def linear(self, x: torch.Tensor, module, original: bool = False) -> torch.Tensor:
        """module(x) for an nn.Linear-like module with `weight` and `bias`, x (N, in); with
        `original`, through the weight a merge replaced, if any (`runtime.merged_into`)."""
        weight, bias = module.weight, module.bias
        if original:
            weight = getattr(weight, MERGED_WEIGHT, weight)
        packed = self._packed(weight) if self.enabled and x.shape[0] >= MIN_ROWS else None
        if packed is None:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def _packed(self, weight: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0] is weight and entry[1] == weight._version:
            return entry[2]
        if hasattr(weight, MERGED_WEIGHT) or not _packable(weight):
            return None
        packed = _pack(weight)
        self._entries[id(weight)] = (weight, weight._version, packed)
        return packed


def packed_weights(model) -> PackedWeights:
    """The model's packed weights (made once per model, kept on it)."""
    store = model.__dict__.get("_fusion_packed")
    if store is None:
        store = model.__dict__["_fusion_packed"] = PackedWeights(model)
    return store


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)


def _packing_on() -> bool:
    return int_env("LORA_STUDIO_PACKED_WEIGHTS", 1) != 0 and _packing_works()


@functools.cache
def _packing_works() -> bool:
    """Whether this build and CPU pack and multiply correctly: a tiny product is tried once (the
    ops exist in builds where they can still fail at run time, e.g. on other architectures)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        weight = torch.arange(12.0).reshape(3, 4) / 7
        x = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
        got = torch.ops.mkldnn._linear_pointwise(x, _pack(weight), None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, F.linear(x, weight), rtol=0, atol=1e-5))


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def _can_pack(model) -> bool:
    if not _packing_on() or not _packable(model.lm_head.weight):
        return False
    total = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total <= MAX_PACKED_BYTES
