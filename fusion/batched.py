"""One forward for many rows at once, each row with its own fusion and its own KV cache.

Each row feeds its new tokens: one when decoding, its whole prompt when it joins. The base
projections run as one matmul over all new tokens; the low-rank deltas of every row come from
the layout's tables (`batch_layout`): one matmul per layer and input for the stacked factors of
every adapter the batch uses, each row's fusion a row of coefficients over them. LoRA-Flow
gates of all rows are one batched matmul per layer; MixLoRA rows share the FFN's base matmuls
with every other row and add their experts' mixture. Attention is per row over the row's own
cache, so no row is padded to another's length. The math is the patched model's (`runtime`),
term by term.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .batch_layout import Layout
from .methods.mixlora_ffn import begin_mixture, expert_mixture
from .packed import packed_weights

BATCHED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports(model) -> bool:
    """Whether `decode_step` computes this model as its own forward does: a Llama-family layer
    (RMSNorm, rotary attention with optional biases, gated MLP) and full attention over the whole
    cache (no sliding window in use)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in BATCHED_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    if kind == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return window is None


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


class _RouterSink:
    """One step's routing of a MixLoRA group's rows, per layer."""

    def __init__(self):
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_router(self, layer: int, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        self.seen[layer] = (probs, chosen)  # (n, E), (n, k)


@torch.inference_mode()
def decode_step(
    model,
    layout: Layout,
    tokens: torch.Tensor,
    caches: list[RowCache],
    runs: list,
    counts: list[int] | None = None,
    original_weights: bool = False,
) -> torch.Tensor:
    """One forward for all rows. tokens: one per row (N,), or with `counts` each row's tokens one
    after another (sum(counts),): a new row's whole prompt (its cache empty) next to the running
    rows' next tokens. Returns each row's logits at its last token (N, V); caches grow by what
    their rows fed. `runs[i]` records row i's gate weights or routing (a `Run`, or None).
    original_weights: the projections read the weights a merge replaced (the layout's plans then
    carry the merged fusion's deltas), see `packed`."""
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
    linear = packed_weights(model).linear
    if original_weights:
        linear = functools.partial(linear, original=True)
    record = any(run is not None and run.record for run in runs)
    for index, layer in enumerate(inner.layers):
        tables = layout.tables[index]
        weights, scales = layout.scales(index, x, record)
        if weights is not None:
            gate_log.append(weights)
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        ys = _projections(linear, attn, ("q_proj", "k_proj", "v_proj"), h, tables, 0, scales)
        head_dim = attn.head_dim
        q = ys["q_proj"].view(m, -1, 1, head_dim)  # (M, H, 1, hd)
        k = ys["k_proj"].view(m, -1, 1, head_dim)  # (M, kvh, 1, hd)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = ys["v_proj"].view(m, -1, head_dim)  # (M, kvh, hd)
        out = [_attend(attn, q, k, v, cache, index, start, end) for cache, (start, end) in zip(caches, spans)]
        o = torch.cat(out).reshape(m, -1)  # (M, H * hd)
        ys = _projections(linear, attn, ("o_proj",), o, tables, 1, scales)
        x = x + ys["o_proj"]
        h = layer.post_attention_layernorm(x)
        x = x + _mlp(layer.mlp, index, h, tables, scales, layout, sinks, linear)
    if m != len(caches):
        x = x.index_select(0, torch.tensor([end - 1 for _, end in spans], device=x.device))
    logits = linear(inner.norm(x), model.lm_head)  # (N, V)
    _record(layout, runs, gate_log, sinks, spans)
    for cache, count in zip(caches, counts):
        cache.length += count
    return logits


def _projections(linear, module, names: tuple, x: torch.Tensor, tables, group: int, scales) -> dict:
    """module's projections `names` of x, each plus its deltas from the layer's table `group`.
    In a decoding step the deltas are computed beside the base projections (`Table.start`)."""
    started = tables is not None and tables.start(group, x, scales)
    ys = None
    try:
        ys = {name: linear(x, getattr(module, name)) for name in names}
    finally:
        if tables is not None:
            tables.finish(group, started, x, ys, scales)
    return ys


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


def _mlp(mlp, layer: int, h: torch.Tensor, tables, scales, layout: Layout, sinks, linear) -> torch.Tensor:
    """h (N, d) -> (N, d). W_gate h, W_up h and W_down m run once for all rows; plain rows add
    their deltas, MixLoRA rows replace their m by their experts' mixture (W_down is linear)."""
    groups = []  # per MixLoRA group: its rows' inputs and its experts' call, begun beside W_gate h, W_up h
    for plan, rows, _ in layout.moe_groups:
        routers, experts, top_k, act = plan.experts
        mine = _take(h, rows)
        groups.append((mine, begin_mixture(mine, routers[layer], experts.get(layer, {}), top_k, act or mlp.act_fn)))
    try:
        ys = _projections(linear, mlp, ("gate_proj", "up_proj"), h, tables, 2, scales)
    except BaseException:
        for _, pending in groups:  # the helper may still be writing into their tensors
            if pending is not None:
                pending.wait()
        raise
    m = mlp.act_fn(ys["gate_proj"]) * ys["up_proj"]  # (N, f)
    extra = []
    for (plan, rows, _), sink, (mine, pending) in zip(layout.moe_groups, sinks, groups):
        gate, up = _take(ys["gate_proj"], rows), _take(ys["up_proj"], rows)
        done = None if pending is None else pending.finish(gate, up)
        if done is None:
            routers, experts, top_k, act = plan.experts
            done = expert_mixture(mine, gate, up, routers[layer], experts.get(layer, {}), top_k, act or mlp.act_fn)
        mixed, down, _, probs, chosen = done
        if isinstance(rows, slice):
            m[rows] = mixed
        else:
            m.index_copy_(0, rows, mixed)
        sink.on_router(layer, probs, chosen)
        if down is not None:
            extra.append((rows, down))
    ys = _projections(linear, mlp, ("down_proj",), m, tables, 3, scales)
    y = ys["down_proj"]
    for rows, down in extra:
        if isinstance(rows, slice):
            y[rows] += down
        else:
            y.index_add_(0, rows, down)
    return y


def _take(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


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
