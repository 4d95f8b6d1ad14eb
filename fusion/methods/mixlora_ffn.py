"""MixLoRA's routed FFN and the fusion plan that runs it (see `mixlora` for the method).

Per decoder layer l, a router R_l (E x d, no bias) reads the FFN input h of each token:
    p = softmax(R_l h) in fp32, keep the top-k, renormalise them to p_hat (sum 1).
Expert e adds its own LoRA deltas to the shared frozen gate/up/down projections:
    m_e = act(W_gate h + dgate_e(h)) * (W_up h + dup_e(h))
    y   = sum_e p_hat_e (W_down m_e + ddown_e(m_e)) = W_down(sum_e p_hat_e m_e) + sum_e p_hat_e ddown_e(m_e)
W_gate h and W_up h are computed once for all tokens and W_down once for the mixture (it is
linear); the reference package recomputes them per expert, with the same result. Attention
projections carry plain, unrouted LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import native
from ..runtime import FusionPlan, LowRankDelta, Run
from .base import BuildContext
from .mixlora_checkpoint import MixLoraAdapter, activation


def _lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dropout: float) -> torch.Tensor:
    if dropout > 0:
        x = F.dropout(x, dropout, training=True)
    return F.linear(F.linear(x, A), B)


def routed_ffn(
    x: torch.Tensor,
    mlp: torch.nn.Module,
    router: torch.Tensor,
    experts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    top_k: int,
    act,
    dropout: float = 0.0,
):
    """MixLoRA's routed FFN on x (B, T, d).

    `experts` maps gate_proj/up_proj/down_proj to (A (E, r, d_in), B (E, d_out, r)) with the
    LoRA scale folded into B. Returns y (B, T, d), router logits (N, E) fp32, probabilities
    (N, E) fp32 and chosen expert ids (N, k), N = B*T.
    """
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    gate = F.linear(flat, mlp.gate_proj.weight, mlp.gate_proj.bias)  # (N, f), shared by all experts
    up = F.linear(flat, mlp.up_proj.weight, mlp.up_proj.bias)  # (N, f)
    mixed, down_delta, logits, probs, chosen = expert_mixture(flat, gate, up, router, experts, top_k, act, dropout)
    y = F.linear(mixed, mlp.down_proj.weight, mlp.down_proj.bias)  # (N, d)
    if down_delta is not None:
        y = y + down_delta
    return y.reshape(x.shape[:-1] + (y.shape[-1],)), logits, probs, chosen


def expert_mixture(
    flat: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    router: torch.Tensor,
    experts: dict,
    top_k: int,
    act,
    dropout: float = 0.0,
):
    """The routed part of the FFN for tokens flat (N, d) whose W_gate h and W_up h (N, f) are
    given (batched decoding computes those for many rows at once). Returns the mixture
    sum_e p_hat_e m_e (N, f) that W_down turns into the output, the experts' down deltas
    sum_e p_hat_e ddown_e(m_e) (N, d) or None, router logits, probabilities and chosen ids."""
    pairs = flat.shape[0] * top_k
    if dropout == 0.0 and flat.device.type == "cpu" and experts:  # all in one call of the C kernel, where it serves
        kernel = _native(_stacked(experts), experts, act)
        done = None if kernel is None else kernel.routed(flat, gate, up, router, top_k)
        if done is not None:
            return done
    logits = F.linear(flat.float(), router.float())  # (N, E)
    probs = torch.softmax(logits, dim=-1)
    top_p, chosen = probs.topk(top_k, dim=-1)  # (N, k)
    top_p = (top_p / top_p.sum(dim=-1, keepdim=True)).to(flat.dtype)
    if dropout == 0.0 and flat.device.type == "cpu" and pairs <= PICKED_SHARE * router.shape[0]:
        mixed, down = _picked_mixture(flat, gate, up, experts, chosen, top_p, act)
        return mixed, down, logits, probs, chosen
    if dropout == 0.0 and pairs <= FEW_PAIRS:
        mixed, down = _masked_mixture(flat, gate, up, experts, chosen, top_p, act)
        return mixed, down, logits, probs, chosen
    mixed = torch.zeros_like(gate)  # (N, f): sum_e p_hat_e m_e
    down_delta = None
    for e in range(router.shape[0]):
        token, pick = torch.where(chosen == e)  # (n,) tokens routed to e, and which of their k picks
        if token.numel() == 0:
            continue
        weight = top_p[token, pick].unsqueeze(-1)  # (n, 1)
        h = flat[token]  # (n, d)
        g, u = gate[token], up[token]  # (n, f)
        if "gate_proj" in experts:
            g = g + _lora(h, experts["gate_proj"][0][e], experts["gate_proj"][1][e], dropout)
        if "up_proj" in experts:
            u = u + _lora(h, experts["up_proj"][0][e], experts["up_proj"][1][e], dropout)
        m = act(g) * u  # (n, f)
        mixed = mixed.index_add(0, token, weight * m)
        if "down_proj" in experts:
            lora = _lora(m, experts["down_proj"][0][e], experts["down_proj"][1][e], dropout)  # (n, d)
            if down_delta is None:
                down_delta = flat.new_zeros(flat.shape[0], lora.shape[-1])  # (N, d)
            down_delta = down_delta.index_add(0, token, weight * lora)
    return mixed, down_delta, logits, probs, chosen


def begin_mixture(flat: torch.Tensor, router: torch.Tensor, experts: dict, top_k: int, act):
    """Begin `expert_mixture` for tokens flat (N, d) before W_gate h and W_up h exist: the
    routing and the experts' gate and up deltas run on the C kernel's helper thread
    (`native.helper`) while the caller computes those. Returns a pending call whose
    `finish(gate, up)` gives what `expert_mixture` does, bit for bit, or None where the kernel
    cannot serve (then call `expert_mixture`). For a decoding step's few tokens only: a prompt's
    tokens run both phases token after token (`expert_mixture`), keeping one token's deltas."""
    if flat.device.type != "cpu" or not experts or flat.shape[0] > native.MAX_ROWS:
        return None
    kernel = _native(_stacked(experts), experts, act)
    return None if kernel is None else kernel.begin(flat, router, top_k, native.helper.current())


FEW_PAIRS = 64  # token-expert pairs up to which the dense path below is taken
PICKED_SHARE = 0.5  # on CPU, up to this many pairs per expert each pick reads its own expert


class LayerExperts(dict):
    """module -> (A (E, r, d_in), B (E, d_out, r)) of one layer's experts, plus the stacked
    forms the few-token paths read, made on first use and kept (a plan's factors do not change;
    training builds a new plan for every step)."""

    _stacked: dict | None = None

    def stacked(self) -> dict:
        if self._stacked is None:
            self._stacked = _stack(self)
        return self._stacked


def _stack(experts: dict) -> dict:
    """Per module B as (E, r, d_out) (row j of expert e: column j of its B), and A of gate and
    up as one (E, P r, d_in) block per expert (P: how many of the two carry experts), so that
    one matmul reads both, for all experts or for one; down's A stays (E, r, f). "experts" holds
    the views `_picked_mixture` reads of each expert (views: no copies, and indexing a list
    costs no tensor operation)."""
    out = {name: B.transpose(1, 2).contiguous() for name, (_, B) in experts.items()}
    inputs = [name for name in ("gate_proj", "up_proj") if name in experts]
    if inputs:
        out["A_in"] = torch.cat([experts[name][0] for name in inputs], 1) if len(inputs) > 1 else experts[inputs[0]][0]
        out["inputs"] = inputs
    num_experts = next(iter(experts.values()))[0].shape[0]
    out["experts"] = [
        {
            "A_in": out["A_in"][e].t() if inputs else None,  # (d, P r)
            **{name: out[name][e] for name in inputs},  # (r, f)
            "down": (experts["down_proj"][0][e].t(), out["down_proj"][e]) if "down_proj" in experts else None,
        }
        for e in range(num_experts)
    ]
    return out


def _stacked(experts: dict) -> dict:
    return experts.stacked() if isinstance(experts, LayerExperts) else _stack(experts)


def _native(stacked: dict, experts: dict, act):
    """The C kernel's view of these experts (`native.NativeExperts`), made once and kept with
    their stacked forms, or None where it cannot serve them (another activation than SiLU)."""
    if not native.experts.is_silu(act):
        return None
    if "native" not in stacked:
        stacked["native"] = native.experts_kernel(stacked, experts, act)
    return stacked["native"]


def _masked_mixture(flat, gate, up, experts, chosen, weights, act):
    """Fast path for a few tokens, with no per-expert Python loop and no token indexing. Every
    expert's A reads the token in one matmul; a mask keeps, for each (token, pick), the ranks of
    the chosen expert, and one matmul with all experts' B side by side gives each pick's delta.
    Reading all E experts' factors costs less here than gathering the chosen ones (`bmm` of
    these thin shapes is slow on CPU: 41 against 14 us for one token). Same value as the loop.
    flat (n, d), gate/up (n, f), chosen/weights (n, k)."""
    n, k = chosen.shape
    if not experts:  # a layer whose experts carry no LoRA: every pick is the plain FFN's
        return (act(gate) * up) * weights.sum(1, keepdim=True), None
    st = _stacked(experts)
    num_experts, rank = next(iter(experts.values()))[0].shape[:2]
    mask = flat.new_zeros(n * k, num_experts, 1).scatter_(1, chosen.reshape(-1, 1, 1), 1.0)
    mask = mask.expand(n * k, num_experts, rank)  # (n k, E, r): the chosen expert's ranks
    g, u = gate.repeat_interleave(k, 0), up.repeat_interleave(k, 0)  # (n k, f)
    if "inputs" in st:
        P = len(st["inputs"])
        t = F.linear(flat, st["A_in"].reshape(-1, flat.shape[-1])).view(n, 1, num_experts, P, rank)
        t = t.expand(n, k, num_experts, P, rank).reshape(n * k, num_experts, P, rank)
        for i, name in enumerate(st["inputs"]):
            picked = (t[:, :, i] * mask).reshape(n * k, -1)  # (n k, E r)
            B = st[name].reshape(-1, st[name].shape[-1])  # (E r, f)
            if name == "gate_proj":
                g = torch.addmm(g, picked, B)
            else:
                u = torch.addmm(u, picked, B)
    m = act(g) * u  # (n k, f)
    w = weights.reshape(n, k, 1)
    mixed = (m.view(n, k, -1) * w).sum(1)  # (n, f)
    down = None
    if "down_proj" in st:
        A, B = experts["down_proj"][0], st["down_proj"]
        t = F.linear(m, A.reshape(-1, A.shape[-1])).view(n * k, num_experts, rank) * mask
        t = t.view(n, k, -1).mul_(w).sum(1)  # (n, E r): p_hat-weighted ranks
        down = torch.mm(t, B.reshape(-1, B.shape[-1]))  # (n, d)
    return mixed, down


def _picked_mixture(flat, gate, up, experts, chosen, weights, act):
    """Fast path for fewer (token, pick) pairs than half the experts, on CPU (one decoding row):
    each pick reads its own expert's factors only, through views (no copies), a few small
    matmuls per pick (`expert_mixture` has already given the C kernel, `native`, its turn). Reading all experts (`_masked_mixture`) reads E/k times the bytes: for
    8 experts, top-2, rank 8 on the embedded model 1.6 MB per layer against 0.4 MB, and a
    decoding step reads them from memory, not from cache. Same value as the loop."""
    n, k = chosen.shape
    if not experts:
        return (act(gate) * up) * weights.sum(1, keepdim=True), None
    st = _stacked(experts)
    rank = next(iter(experts.values()))[0].shape[1]
    per, picks = st["experts"], chosen.tolist()
    f = gate.shape[-1]
    g = gate.unsqueeze(1).expand(n, k, f).contiguous().view(n * k, f)  # (n k, f), row i k + p: copies
    u = up.unsqueeze(1).expand(n, k, f).contiguous().view(n * k, f)
    if "inputs" in st:
        outs = {"gate_proj": g, "up_proj": u}
        for i in range(n):
            for p, e in enumerate(picks[i]):
                j = i * k + p
                t = torch.mm(flat[i : i + 1], per[e]["A_in"])  # (1, P r)
                for q, name in enumerate(st["inputs"]):
                    outs[name][j : j + 1].addmm_(t[:, q * rank : (q + 1) * rank], per[e][name])
    m = act(g) * u  # (n k, f)
    w = weights.reshape(n, k, 1)
    mixed = (m.view(n, k, -1) * w).sum(1)  # (n, f)
    down = None
    if "down_proj" in st:
        order = [e for row in picks for e in row]  # pick j = i k + p
        t = torch.cat([torch.mm(m[j : j + 1], per[e]["down"][0]) for j, e in enumerate(order)])  # (n k, r)
        t = t * weights.reshape(-1, 1)  # a tensor, not a number: the weights' gradient flows in training
        down = flat.new_zeros(n, st["down_proj"].shape[-1])  # (n, d)
        for j, e in enumerate(order):
            down[j // k : j // k + 1].addmm_(t[j : j + 1], per[e]["down"][1])
    return mixed, down


@dataclass
class _DropoutDelta(LowRankDelta):
    """A plain LoRA delta with dropout on its input (training only)."""

    dropout: float = 0.0

    def apply(self, x, y, run, layer):
        return super().apply(F.dropout(x, self.dropout, training=True), y, run, layer)


def plan_from_adapter(
    ctx: BuildContext, adapter: MixLoraAdapter, top_k: int, training: bool = False, name: str = "mixlora"
) -> FusionPlan:
    """A plan over the adapter's tensors. With `training`, LoRA inputs get dropout and each
    layer's router logits are appended to `run.extra_losses` for the load-balance loss."""
    config = adapter.config
    dropout = config.lora_dropout if training else 0.0
    deltas = {}
    for key, f in adapter.attention.items():
        A, B = f.A.to(ctx.device, ctx.dtype), f.B.to(ctx.device, ctx.dtype) * f.scale
        deltas[key] = _DropoutDelta(A, B, dropout=dropout) if dropout > 0 else LowRankDelta(A, B)
    per_layer: dict[int, LayerExperts] = {}
    for (layer, module), f in adapter.experts.items():
        per_layer.setdefault(layer, LayerExperts())[module] = (
            f.A.to(ctx.device, ctx.dtype),
            f.B.to(ctx.device, ctx.dtype) * f.scale,
        )
    routers = [r.to(ctx.device, torch.float32) for r in adapter.routers]
    act = activation(config.act_fn) if config.act_fn else None

    def mlp_override(layer: int, mlp: torch.nn.Module, x: torch.Tensor, run: Run) -> torch.Tensor:
        if training and config.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - config.jitter_noise, 1.0 + config.jitter_noise)
        y, logits, probs, chosen = routed_ffn(
            x, mlp, routers[layer], per_layer.get(layer, {}), top_k, act or mlp.act_fn, dropout
        )
        batch, tokens = x.shape[0], x.shape[1]
        run.on_router(layer, probs.view(batch, tokens, -1), chosen.view(batch, tokens, -1))
        if training:
            run.extra_losses.append(logits)
        return y

    return FusionPlan(
        method=name,
        slot_names=[f"expert {e}" for e in range(config.num_experts)],
        deltas=deltas,
        mlp_override=mlp_override,
        trace_kind="router",
        experts=None if training else (routers, per_layer, top_k, act),
        info={"top_k": top_k, "num_experts": config.num_experts, "training": training},
    )
