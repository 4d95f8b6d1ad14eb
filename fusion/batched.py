"""One decode step for many rows at once, each row with its own fusion and its own KV cache.

Every row feeds one token. The base projections run as one matmul over all rows. The low-rank
deltas of all rows come from one table per layer and input (q/k/v; o; gate/up; down): the
factors of every adapter the batch uses, stacked once (an adapter shared by several fusions is
read once), and each row's fusion becomes a row of coefficients over that table: fixed for
static methods, times the row's per-token gate weight for LoRA-Flow. Fused factors that belong
to no adapter (TIES, DARE, LoraHub, MixLoRA's attention LoRAs) are table entries of their own.
LoRA-Flow gates of all rows are one batched matmul per layer; MixLoRA rows share the FFN's
base matmuls with every other row and add their experts' mixture. Attention is per row over the row's own cache, so no row is padded to
another's length. The math is the patched model's (`runtime`), term by term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .methods.mixlora_ffn import expert_mixture
from .runtime import SHARED_INPUTS, FusionPlan, GroupMember, delta_factors

GROUPS = SHARED_INPUTS[:1] + (("o_proj",),) + SHARED_INPUTS[1:] + (("down_proj",),)


class RowCache:
    """One row's keys and values per layer, (kv_heads, capacity, head_dim), sized to the row."""

    def __init__(self, prefill, capacity: int):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in prefill.layers:
            for source, store in ((layer.keys[0], self.keys), (layer.values[0], self.values)):
                buffer = source.new_empty(source.shape[0], capacity, source.shape[2])
                buffer[:, : source.shape[1]] = source
                store.append(buffer)
        self.length = prefill.layers[0].keys.shape[-2]

    @classmethod
    def empty(cls, config, capacity: int, device, dtype) -> RowCache:
        """A row's cache before its prompt: filled by the forward that reads the prompt."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = object.__new__(cls)
        shape = (config.num_key_value_heads, capacity, head_dim)
        cache.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        cache.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        cache.length = 0
        return cache

    @staticmethod
    def bytes_for(config, tokens: int, dtype: torch.dtype) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * itemsize


def _entries(delta, dynamic: bool):
    """(key, A (r, d_in), B (d_out, r), coefficient, slot per rank (r,) or None) of one delta.

    Deltas built from adapters name their parts: those share the adapter's own factors (key:
    the factors object). Anything else is one entry of its own with coefficient 1."""
    if delta.parts:
        for factors, coef, slot in delta.parts:
            slots = torch.full((factors.rank,), slot, dtype=torch.long) if dynamic else None
            yield id(factors), factors.A, factors.B, float(coef), slots
        return
    if isinstance(delta, GroupMember):
        A, B = delta_factors(delta)
        slots = delta.group.slot_of_rank
        slots = None if slots is None else slots[delta.start : delta.end]
        yield (id(delta.group), delta.start), A, B, 1.0, slots
    else:  # a dynamic delta keeps its per-rank slots; its fixed factor, if any, goes into B
        yield id(delta), delta.A, (delta.B if delta.coef is None else delta.B * delta.coef), 1.0, delta.slot_of_rank


@dataclass
class Table:
    """The deltas of the projections of one layer that read the same input, for all rows. A row
    that uses none of them has coefficients 0: it adds exact zeros, which costs less than
    selecting the rows that use the table (the factors are read either way)."""

    A: torch.Tensor  # (R, d_in): every entry's A, module after module
    members: list  # (module, start, end, B (d_out, end - start))
    coef: torch.Tensor  # (N, R) fixed coefficient of each rank for each row
    slots: torch.Tensor | None  # (N, R) column of the row's gate table scaling each rank (0: none)

    def select(self, keep: torch.Tensor) -> Table | None:
        """This table for the rows `keep` (old indices, in order) of its batch; None if none of
        them uses it. The factors are not rebuilt: columns no kept row uses stay, with
        coefficient 0, until the next rebuild."""
        coef = self.coef.index_select(0, keep)
        if not bool(coef.any()):
            return None
        return Table(self.A, self.members, coef, None if self.slots is None else self.slots.index_select(0, keep))

    def apply(self, x: torch.Tensor, ys: dict, gates: torch.Tensor | None) -> None:
        """x (N, d_in); ys: module -> (N, d_out), updated in place; gates (N, 1 + S)."""
        h = F.linear(x, self.A)  # (N, R)
        coef = self.coef if self.slots is None or gates is None else self.coef * gates.gather(1, self.slots)
        h = h * coef
        for name, start, end, B in self.members:
            ys[name] = torch.addmm(ys[name], h[:, start:end], B.t())


def build_table(layer: int, names: tuple[str, ...], plans: list[FusionPlan], device, dtype) -> Table | None:
    n = len(plans)
    columns: dict = {}  # (module, key) -> (start, end)
    As, members, assigned = [], [], []  # assigned: (row, start, end, coef, slots)
    width = 0
    for name in names:
        Bs, start_of_module = [], width
        for row, plan in enumerate(plans):
            delta = plan.deltas.get((layer, name))
            if delta is None:
                continue
            dynamic = plan.layer_gate is not None
            for key, A, B, coef, slots in _entries(delta, dynamic):
                span = columns.get((name, key))
                if span is None:
                    span = columns[(name, key)] = (width, width + A.shape[0])
                    width += A.shape[0]
                    As.append(A.to(device, dtype))
                    Bs.append(B.to(device, dtype))
                assigned.append((row, *span, coef, slots))
        if Bs:
            members.append((name, start_of_module, width, torch.cat(Bs, 1)))
    if not As:
        return None
    coef = torch.zeros(n, width)
    slots = torch.zeros((n, width), dtype=torch.long)  # 0: the constant-1 column
    for row, start, end, c, s in assigned:
        coef[row, start:end] = c
        if s is not None:
            slots[row, start:end] = s + 1
    dynamic = bool((slots > 0).any())
    return Table(torch.cat(As, 0), members, coef.to(device, dtype), slots.to(device) if dynamic else None)


class Layout:
    """What one batch composition needs at every step: tables, stacked gates, MoE groups.
    Built when rows join or leave; `plans[i]` is the plan row i computes with."""

    def __init__(self, model, plans: list[FusionPlan]):
        self.plans = plans
        weight = model.lm_head.weight
        device, dtype = weight.device, weight.dtype
        self.device = device
        layers = model.config.num_hidden_layers
        self.n = self.built_rows = len(plans)
        moe = [i for i, p in enumerate(plans) if p.mlp_override is not None]
        self.moe_groups: list[tuple[FusionPlan, torch.Tensor, list[int]]] = []
        for plan in {id(plans[i]): plans[i] for i in moe}.values():
            if plan.experts is None:
                raise ValueError(f"method {plan.method!r} replaces the FFN but has no expert tensors to batch")
            members = [i for i in moe if plans[i] is plan]
            self.moe_groups.append((plan, torch.tensor(members, dtype=torch.long, device=device), members))
        # MixLoRA plans carry no FFN deltas, so their rows are in no FFN table.
        self.tables = [[build_table(layer, names, plans, device, dtype) for names in GROUPS] for layer in range(layers)]
        self.flow = [i for i, p in enumerate(plans) if p.layer_gate is not None]
        self.gates = None
        self.flow_token_rows = None  # in a layout of tokens: each LoRA-Flow token's row in the gate stacks
        if self.flow:
            self._stack_gates(device, dtype)

    def select(self, keep: list[int]) -> Layout:
        """The layout of rows `keep` (indices into this one's rows, in order; an index may repeat,
        which is how a row feeding several tokens becomes one layout row per token): every tensor
        is indexed, nothing is rebuilt. Each kept row computes exactly what it computed before
        (the columns of adapters only departed rows used get coefficient 0)."""
        out = object.__new__(Layout)
        out.plans, out.n = [self.plans[i] for i in keep], len(keep)
        out.built_rows, out.device = self.built_rows, self.device
        out.moe_groups = []
        for plan, _, members in self.moe_groups:
            chosen = set(members)
            kept = [new for new, old in enumerate(keep) if old in chosen]
            if kept:
                out.moe_groups.append((plan, torch.tensor(kept, dtype=torch.long, device=self.device), kept))
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        out.tables = [[None if t is None else t.select(index) for t in layer] for layer in self.tables]
        if self.flow_token_rows is not None:
            raise ValueError("a layout of tokens cannot be narrowed again")
        flow_at = {old: j for j, old in enumerate(self.flow)}
        kept_flow = [flow_at[old] for old in keep if old in flow_at]  # per kept flow row or token
        out.flow = [new for new, old in enumerate(keep) if old in flow_at]
        out.gates, out.flow_token_rows = None, None
        if out.flow:
            unique = list(dict.fromkeys(kept_flow))  # the gate stacks stay one per row
            index = torch.tensor(unique, dtype=torch.long, device=self.device)
            if len(unique) != len(kept_flow):
                at = {j: u for u, j in enumerate(unique)}
                out.flow_token_rows = torch.tensor([at[j] for j in kept_flow], dtype=torch.long, device=self.device)
            out.gate_width = self.gate_width
            out.flow_ks = [self.flow_ks[j] for j in kept_flow]
            out.flow_rows = torch.tensor(out.flow, dtype=torch.long, device=self.device)
            out.gate_W = self.gate_W.index_select(1, index)
            out.gate_b = self.gate_b.index_select(1, index)
            out.gate_mask = None if self.gate_mask is None else self.gate_mask.index_select(0, index)
            out.gate_temps = None if self.gate_temps is None else self.gate_temps.index_select(0, index)
        return out

    def _stack_gates(self, device, dtype) -> None:
        ks = [len(self.plans[i].slot_names) for i in self.flow]
        width = max(ks)
        self.gate_width = width
        self.flow_ks = ks
        self.flow_rows = torch.tensor(self.flow, dtype=torch.long, device=device)
        W, b, mask, temps = [], [], [], []
        for i, k in zip(self.flow, ks):
            plan = self.plans[i]
            if plan.gate_tensors is None:
                raise ValueError(f"method {plan.method!r} has a gate but no gate tensors to batch")
            Wi, bi, t = plan.gate_tensors  # (L, k, d), (L, 1, k)
            W.append(F.pad(Wi.to(device, dtype), (0, 0, 0, width - k)))
            b.append(F.pad(bi[:, 0].to(device, dtype), (0, width - k)))
            mask.append(F.pad(torch.zeros(k), (0, width - k), value=float("-inf")))
            temps.append(float(t))
        self.gate_W = torch.stack(W, 1)  # (L, n_flow, S, d)
        self.gate_b = torch.stack(b, 1)  # (L, n_flow, S)
        self.gate_mask = torch.stack(mask).to(device, dtype) if width > min(ks) else None  # (n_flow, S)
        self.gate_temps = (
            torch.tensor(temps, device=device, dtype=dtype).unsqueeze(-1) if any(t != 1.0 for t in temps) else None
        )  # (n_flow, 1)

    def gate(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) the residual stream entering the layer -> (gate weights of the LoRA-Flow rows
        (n_flow, S), every row's table: a constant-1 column, then its weights (N, 1 + S))."""
        h = x.index_select(0, self.flow_rows) if len(self.flow) != self.n else x
        W, b = self.gate_W[layer], self.gate_b[layer]  # (R, S, d), (R, S): one per LoRA-Flow row
        mask, temps, rows = self.gate_mask, self.gate_temps, self.flow_token_rows
        if rows is None:  # one token per row
            logits = torch.bmm(W, h.unsqueeze(-1)).squeeze(-1)  # (n_flow, S)
        else:  # several tokens per row: every token against every row's gate, then its own row's
            S = W.shape[1]
            every = F.linear(h, W.reshape(-1, W.shape[-1])).view(h.shape[0], -1, S)  # (n_flow, R, S)
            logits = every.gather(1, rows.view(-1, 1, 1).expand(-1, 1, S)).squeeze(1)
            b = b.index_select(0, rows)
            mask = None if mask is None else mask.index_select(0, rows)
            temps = None if temps is None else temps.index_select(0, rows)
        if temps is not None:
            logits = logits / temps
        if mask is not None:
            logits = logits + mask
        weights = torch.softmax(logits, dim=-1) + b
        table = x.new_ones(self.n, self.gate_width + 1)
        table.index_copy_(0, self.flow_rows, F.pad(weights, (1, 0), value=1.0))
        return weights, table


class _RouterSink:
    """One step's routing of a MixLoRA group's rows, per layer."""

    def __init__(self):
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_router(self, layer: int, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        self.seen[layer] = (probs, chosen)  # (n, E), (n, k)


@torch.inference_mode()
def decode_step(
    model, layout: Layout, tokens: torch.Tensor, caches: list[RowCache], runs: list, counts: list[int] | None = None
) -> torch.Tensor:
    """One forward for all rows. tokens: one per row (N,), or with `counts` each row's tokens one
    after another (sum(counts),): a new row's whole prompt (its cache empty) next to the running
    rows' next tokens. Returns each row's logits at its last token (N, V); caches grow by what
    their rows fed. `runs[i]` records row i's gate weights or routing (a `Run`, or None)."""
    inner = model.model
    counts = counts or [1] * len(caches)
    m = tokens.shape[0]
    spans = []  # (first token, end) per row
    for count in counts:
        start = spans[-1][1] if spans else 0
        spans.append((start, start + count))
    if m != len(caches):  # one layout row per token
        layout = layout.select([i for i, count in enumerate(counts) for _ in range(count)])
    x = inner.embed_tokens(tokens)  # (M, d)
    positions = torch.tensor(
        [[c.length + t] for c, count in zip(caches, counts) for t in range(count)], device=x.device
    )  # (M, 1)
    cos, sin = inner.rotary_emb(x.unsqueeze(1), positions)  # (M, 1, hd)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (M, 1, 1, hd)
    gate_log, sinks = [], [_RouterSink() for _ in layout.moe_groups]
    for index, layer in enumerate(inner.layers):
        tables = layout.tables[index]
        gates = None
        if layout.flow:
            weights, gates = layout.gate(index, x)
            gate_log.append(weights)
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        ys = {
            name: F.linear(h, getattr(attn, name).weight, getattr(attn, name).bias)
            for name in ("q_proj", "k_proj", "v_proj")
        }
        if tables[0] is not None:
            tables[0].apply(h, ys, gates)
        head_dim = attn.head_dim
        q = ys["q_proj"].view(m, -1, 1, head_dim)  # (M, H, 1, hd)
        k = ys["k_proj"].view(m, -1, 1, head_dim)  # (M, kvh, 1, hd)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = ys["v_proj"].view(m, -1, head_dim)  # (M, kvh, hd)
        out = [_attend(attn, q, k, v, cache, index, start, end) for cache, (start, end) in zip(caches, spans)]
        o = torch.cat(out).reshape(m, -1)  # (M, H * hd)
        ys = {"o_proj": F.linear(o, attn.o_proj.weight, attn.o_proj.bias)}
        if tables[1] is not None:
            tables[1].apply(o, ys, gates)
        x = x + ys["o_proj"]
        h = layer.post_attention_layernorm(x)
        x = x + _mlp(layer.mlp, index, h, tables, gates, layout, sinks)
    if m != len(caches):
        x = x.index_select(0, torch.tensor([end - 1 for _, end in spans], device=x.device))
    logits = model.lm_head(inner.norm(x))  # (N, V)
    _record(layout, runs, gate_log, sinks, spans)
    for cache, count in zip(caches, counts):
        cache.length += count
    return logits


def _attend(attn, q, k, v, cache: RowCache, layer: int, start: int, end: int) -> torch.Tensor:
    """One row's attention over its own cache after writing its new keys and values: q/k (M,
    heads, 1, hd), v (M, kvh, hd) of the whole batch, the row's tokens start:end. Several new
    tokens (a prompt) need an empty cache: they attend causally among themselves."""
    count, past = end - start, cache.length
    keys, values = cache.keys[layer], cache.values[layer]
    keys[:, past : past + count] = k[start:end, :, 0].transpose(0, 1)
    values[:, past : past + count] = v[start:end].transpose(0, 1)
    if count > 1 and past:
        raise ValueError("several new tokens for a row with a cache are not supported")
    query = q[start:end, :, 0].transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
    # 4-D: with 3-D inputs the CPU kernel takes a path ~300x slower
    out = F.scaled_dot_product_attention(
        query,
        keys[None, :, : past + count],
        values[None, :, : past + count],
        scale=attn.scaling,
        is_causal=count > 1,
        enable_gqa=True,
    )  # (1, H, T, hd)
    return out[0].transpose(0, 1)  # (T, H, hd)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _mlp(mlp, layer: int, h: torch.Tensor, tables, gates, layout: Layout, sinks) -> torch.Tensor:
    """h (N, d) -> (N, d). W_gate h, W_up h and W_down m run once for all rows; plain rows add
    their deltas, MixLoRA rows replace their m by their experts' mixture (W_down is linear)."""
    ys = {name: F.linear(h, getattr(mlp, name).weight, getattr(mlp, name).bias) for name in ("gate_proj", "up_proj")}
    if tables[2] is not None:
        tables[2].apply(h, ys, gates)
    m = mlp.act_fn(ys["gate_proj"]) * ys["up_proj"]  # (N, f)
    extra = []
    for (plan, rows, _), sink in zip(layout.moe_groups, sinks):
        routers, experts, top_k, act = plan.experts
        mixed, down, _, probs, chosen = expert_mixture(
            h.index_select(0, rows),
            ys["gate_proj"].index_select(0, rows),
            ys["up_proj"].index_select(0, rows),
            routers[layer],
            experts.get(layer, {}),
            top_k,
            act or mlp.act_fn,
        )
        m.index_copy_(0, rows, mixed)
        sink.on_router(layer, probs, chosen)
        if down is not None:
            extra.append((rows, down))
    ys = {"down_proj": F.linear(m, mlp.down_proj.weight, mlp.down_proj.bias)}
    if tables[3] is not None:
        tables[3].apply(m, ys, gates)
    y = ys["down_proj"]
    for rows, down in extra:
        y.index_add_(0, rows, down)
    return y


def _record(layout: Layout, runs: list, gate_log: list, sinks: list, spans: list) -> None:
    """Hand every recording row its own part of this forward, as its solo forward would record
    it: per layer, its tokens' gate weights (T, k), or their router probabilities (T, E) and
    chosen experts (T, k). `layout` has one row per token; spans[i] are row i's tokens."""
    recording = [i for i, run in enumerate(runs) if run is not None and run.record]
    if not recording:
        return
    token_row = [i for i, (start, end) in enumerate(spans) for _ in range(start, end)]
    if gate_log:
        stacked = torch.stack(gate_log).float().cpu()  # (L, n_flow tokens, S)
        flow_rows = [token_row[t] for t in layout.flow]
        for i in recording:
            mine = [j for j, row in enumerate(flow_rows) if row == i]
            if mine:
                first, k = mine[0], layout.flow_ks[mine[0]]
                part = stacked[:, first : first + len(mine), :k]
                runs[i].steps.append({layer: part[layer] for layer in range(part.shape[0])})
    for (_, _, members), sink in zip(layout.moe_groups, sinks):
        if not sink.seen:
            continue
        layers = sorted(sink.seen)
        probs = torch.stack([sink.seen[l][0] for l in layers]).float().cpu()  # (L, n, E)
        chosen = torch.stack([sink.seen[l][1] for l in layers]).cpu()  # (L, n, k)
        group_rows = [token_row[t] for t in members]
        for i in recording:
            mine = [j for j, row in enumerate(group_rows) if row == i]
            if mine:
                a, b = mine[0], mine[0] + len(mine)
                runs[i].router_steps.append({l: (probs[n, a:b], chosen[n, a:b]) for n, l in enumerate(layers)})
