"""Plotly figures of a Trace: which LoRA (or expert) each layer leaned on, token by token.

Rows are layers and columns are tokens, as in ecco; LoRA-Flow gates get a diverging scale of
task-minus-language weight, MixLoRA routers a categorical colour per top-1 expert (as in the
Mixtral paper's token colouring), static methods their fixed per-layer weights. Hovering a
cell always shows every slot's exact value. No UI framework is imported here.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from .generate import PART_OF_NEXT
from .trace import Trace

# Token windows: what part of prompt + reply a heatmap shows.
VIEW_REPLY = "reply"
VIEW_TAIL = "tail"  # the last N prompt tokens, then the reply
VIEW_ALL = "all"

DIFFERENCE = "task − language"  # gate traces with two slots: last slot minus first slot
TOP_EXPERT = "top-1 expert"  # router traces: categorical colour
MEAN_MODULE = "mean of modules"

PALETTE = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52"]
_FONT = dict(family="Inter, system-ui, sans-serif", size=12)


def display_token(token: str) -> str:
    """A token as one readable label: newlines and tabs made visible, blanks shown as ␣."""
    shown = token.replace("\n", "↵").replace("\t", "⇥")
    if not shown.strip():
        return "␣" * max(1, len(shown))
    return shown if len(shown) <= 16 else shown[:15] + "…"


def readable_tokens(tokens: list[str]) -> list[str]:
    """Token labels that read as text: a token holding only the first bytes of a character split
    over several tokens (marked PART_OF_NEXT) shows that character after a "·", e.g. "·答", "答"."""
    out = list(tokens)
    following = ""
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] == PART_OF_NEXT:
            out[i] = PART_OF_NEXT + following if following else PART_OF_NEXT
        else:
            following = tokens[i].lstrip()[:1]
    return out


def _rows(trace: Trace) -> int:
    # Draw only tokens that have weights, should a trace (e.g. one loaded from a file) hold fewer rows.
    return min(len(trace.tokens), int(trace.weights.shape[0]))


def token_window(trace: Trace, view: str = VIEW_TAIL, prompt_tail: int = 16) -> list[int]:
    """Indices of the tokens a view shows, in order."""
    n = _rows(trace)
    first_reply = min(trace.prompt_tokens, n)
    if view == VIEW_ALL:
        return list(range(n))
    if view == VIEW_REPLY and first_reply < n:
        return list(range(first_reply, n))
    start = max(0, first_reply - max(0, int(prompt_tail)))
    indices = list(range(start, n))
    return indices or list(range(n))


def slot_options(trace: Trace) -> list[str]:
    """What a heatmap cell can show for this trace: a difference, the top expert, or one slot."""
    if trace.kind == "router":
        return [TOP_EXPERT] + list(trace.slot_names)
    if len(trace.slot_names) == 2:
        return [DIFFERENCE] + list(trace.slot_names)
    return list(trace.slot_names)


def default_slot(trace: Trace) -> str | None:
    options = slot_options(trace)
    if not options:
        return None
    # With k > 2 the last slot is the task LoRA by convention.
    return options[0] if trace.kind == "router" or len(trace.slot_names) == 2 else options[-1]


def module_options(trace: Trace) -> list[str]:
    if trace.kind != "static" or not trace.module_weights:
        return []
    return [MEAN_MODULE] + list(trace.module_weights)


def _values(weights: torch.Tensor, trace: Trace, slot: str | None) -> tuple[torch.Tensor, str]:
    """weights (..., k) -> the shown value (...) and which option it is (see slot_options)."""
    if slot not in slot_options(trace):
        slot = default_slot(trace)
    if slot == DIFFERENCE:
        return weights[..., 1] - weights[..., 0], DIFFERENCE
    if slot == TOP_EXPERT:
        return weights.argmax(-1).float(), TOP_EXPERT
    return weights[..., trace.slot_names.index(slot)], slot


def _layout(fig: go.Figure, title: str, height: int, x_title: str) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=14)),
        height=height,
        margin=dict(l=56, r=20, t=44, b=80),
        font=_FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    fig.update_xaxes(title_text=x_title, showgrid=False)
    return fig


def empty_figure(message: str, height: int = 260) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14, color="#555")
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height, "")


def _height(layers: int, compact: bool) -> int:
    per_row = 9 if compact else 14
    return max(260, per_row * layers + 140)


def heatmap(
    trace: Trace,
    view: str = VIEW_TAIL,
    prompt_tail: int = 16,
    slot: str | None = None,
    module: str | None = None,
    compact: bool = False,
) -> go.Figure:
    """The trace as layers x tokens (dynamic methods) or layers x LoRAs (static methods).

    The figure's first trace has one z row per layer.
    """
    if not trace.slot_names or trace.weights.shape[-1] == 0:
        return empty_figure(f"{trace.method}: no adapter is applied, so there is nothing to show")
    if trace.kind == "static":
        return _static_heatmap(trace, module, compact)
    layers = int(trace.weights.shape[1])
    indices = token_window(trace, view, prompt_tail)
    weights = trace.weights[indices].float()  # (T, L, k)
    values, name = _values(weights, trace, slot)  # (T, L)
    z = values.T  # (L, T)
    hover = _hover_text(trace, indices, weights, name)
    x = list(range(len(indices)))
    readable = readable_tokens(trace.tokens)
    labels = [display_token(readable[i]) for i in indices]
    every = max(1, len(indices) // (20 if compact else 48))  # keep tick labels legible on long windows
    # every variant: one cell per layer and token, its exact values on hover
    cells = dict(
        z=z.tolist(), x=x, y=list(range(layers)), text=hover, hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1
    )
    if name == TOP_EXPERT:
        k = len(trace.slot_names)
        colours = [PALETTE[i % len(PALETTE)] for i in range(k)]
        scale = [[edge, colours[min(i, k - 1)]] for i in range(k) for edge in (i / k, (i + 1) / k)]
        data = go.Heatmap(
            **cells,
            colorscale=scale,
            zmin=-0.5,
            zmax=k - 0.5,
            colorbar=dict(title="top-1", tickvals=list(range(k)), ticktext=trace.slot_names),
        )
        title = "Router: top-1 expert per token and layer"
    elif name == DIFFERENCE:
        extent = max(1e-6, float(z.abs().max()))
        data = go.Heatmap(
            **cells,
            colorscale="RdBu_r",
            zmid=0.0,
            zmin=-extent,
            zmax=extent,
            colorbar=dict(title=dict(text=f"{trace.slot_names[1]}<br>minus<br>{trace.slot_names[0]}", side="top")),
        )
        title = f"Gates: red = {trace.slot_names[1]}, blue = {trace.slot_names[0]}"
    else:
        # Router probabilities lie in [0, 1]: a fixed scale keeps two replies comparable. Raw
        # LoRA-Flow gates may leave [0, 1], so their scale follows the data.
        fixed = dict(zmin=0.0, zmax=1.0) if trace.kind == "router" else {}
        data = go.Heatmap(
            **cells,
            colorscale="Viridis",
            colorbar=dict(title=name),
            **fixed,
        )
        title = f"{'Router probability' if trace.kind == 'router' else 'Gate weight'} of {name}"
    fig = go.Figure(data)
    first_reply = trace.prompt_tokens - indices[0] - 0.5
    if 0 < first_reply < len(indices):
        fig.add_vline(x=first_reply, line=dict(color="#222", width=2, dash="dot"))
        fig.add_annotation(
            x=first_reply,
            y=1.0,
            yref="paper",
            text="reply →",
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            font=dict(size=11),
        )
    fig.update_xaxes(tickmode="array", tickvals=x[::every], ticktext=labels[::every], tickangle=-60)
    fig.update_yaxes(title_text="layer", autorange=True, dtick=max(1, layers // 15))
    return _layout(fig, title, _height(layers, compact), "token")


def _hover_text(trace: Trace, indices: list[int], weights: torch.Tensor, name: str) -> list[list[str]]:
    """One string per cell, [layer][token]: token, layer and every slot's exact weight."""
    layers = weights.shape[1]
    rows = []
    chosen = trace.chosen[indices] if trace.chosen is not None else None  # (T, L, top_k)
    readable = readable_tokens(trace.tokens)
    for layer in range(layers):
        row = []
        for column, index in enumerate(indices):
            part = "reply" if index >= trace.prompt_tokens else "prompt"
            token = (
                f"part of {readable[index][1:]!r}"
                if trace.tokens[index] == PART_OF_NEXT and readable[index][1:]
                else repr(trace.tokens[index])
            )
            lines = [f"token #{index} ({part}): {token}", f"layer {layer}"]
            w = weights[column, layer].tolist()
            lines += [f"{slot_name}: {value:.4f}" for slot_name, value in zip(trace.slot_names, w)]
            if trace.kind == "gate" and len(w) == 2:
                lines.append(f"{DIFFERENCE}: {w[1] - w[0]:+.4f}")
            if chosen is not None:
                picked = [trace.slot_names[i] for i in chosen[column, layer].tolist() if 0 <= i < len(w)]
                lines.append("top-k: " + ", ".join(picked))
            row.append("<br>".join(lines))
        rows.append(row)
    return rows


def _static_heatmap(trace: Trace, module: str | None, compact: bool) -> go.Figure:
    per_layer = trace.weights[0].float()  # (L, k): identical for every token
    if module and trace.module_weights and module in trace.module_weights:
        per_layer = trace.module_weights[module].float()
    else:
        module = None
    layers, k = per_layer.shape
    hover = [
        [f"layer {layer}<br>{trace.slot_names[s]}: {float(per_layer[layer, s]):.4f}" for s in range(k)]
        for layer in range(layers)
    ]
    finite = per_layer.nan_to_num(0.0)
    extent = max(1e-6, float(finite.abs().max()))
    if float(finite.min()) >= 0:
        # All weights non-negative (averages, CAT, LoraHub): darker = more weight, from 0, so
        # 0.44 and 0.56 differ visibly; a sign-centred scale would show both as pale.
        scale = dict(colorscale="Blues", zmin=0.0, zmax=max(1.0, extent))
    else:  # negated task vectors: the sign matters
        scale = dict(colorscale="RdBu_r", zmid=0.0, zmin=-extent, zmax=extent)
    fig = go.Figure(
        go.Heatmap(
            z=per_layer.tolist(),
            x=list(trace.slot_names),
            y=list(range(layers)),
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            xgap=2,
            ygap=1,
            # values in the cells only while the cells are tall enough to read them
            texttemplate="%{z:.2f}" if layers <= 12 and k <= 8 else None,
            colorbar=dict(title="weight"),
            **scale,
        )
    )
    fig.update_yaxes(title_text="layer", dtick=max(1, layers // 15))
    where = f" ({module})" if module else ""
    title = f"{trace.method}: fixed weights{where} (every token)"
    return _layout(fig, title, _height(layers, compact), "adapter")


def token_scores(trace: Trace, layer: int | None = None, slot: str | None = None) -> list[tuple[str, float]]:
    """The reply's tokens with a score in [-1, 1] for one layer (or the mean over layers).

    Two-slot gates: task minus language weight; routers on top-1: the top expert's probability;
    otherwise the chosen slot's weight. Values are clipped to [-1, 1].
    """
    n = _rows(trace)
    if not trace.slot_names or trace.prompt_tokens >= n:
        return [(trace.tokens[i], None) for i in range(trace.prompt_tokens, len(trace.tokens))]
    weights = trace.weights[trace.prompt_tokens : n].float()  # (T, L, k)
    if layer is None or not (0 <= int(layer) < weights.shape[1]):
        per_token = weights.mean(dim=1)  # (T, k)
    else:
        per_token = weights[:, int(layer)]
    if trace.kind == "router" and (slot in (None, TOP_EXPERT) or slot not in trace.slot_names):
        scores = per_token.max(dim=-1).values
    else:
        scores, _ = _values(per_token, trace, slot)
    scores = scores.clamp(-1.0, 1.0)
    # Tokens holding the first bytes of a split character are left empty, so the highlighted
    # reply reads as the text; the character itself sits on its last token.
    reply = trace.tokens[trace.prompt_tokens :]
    return [("" if token == PART_OF_NEXT else token, round(float(s), 4)) for token, s in zip(reply, scores)]


def loss_figure(losses: list[float], total_steps: int | None = None, title: str = "Training loss") -> go.Figure:
    steps = list(range(1, len(losses) + 1))
    fig = go.Figure(
        go.Scatter(
            x=steps,
            y=list(losses),
            mode="lines+markers",
            line=dict(color=PALETTE[0]),
            marker=dict(size=4),
            hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>",
        )
    )
    if total_steps:
        fig.update_xaxes(range=[0.5, max(total_steps, len(losses)) + 0.5])
    fig.update_yaxes(title_text="loss", gridcolor="#eee")
    return _layout(fig, title, 300, "step")


def trace_summary(trace: Trace | None) -> dict | None:
    if trace is None:
        return None
    return {
        "shape": list(trace.shape),
        "slot_names": list(trace.slot_names),
        "kind": trace.kind,
        "method": trace.method,
        "prompt_tokens": trace.prompt_tokens,
    }
