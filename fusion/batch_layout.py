"""What one batch composition needs at every step of `batched.decode_step`.

Per layer and input (q/k/v; o; gate/up; down) a `Table`: the factors of every adapter the
batch uses, stacked once (an adapter shared by several fusions is read once), and each row's
fusion as a row of coefficients over it: fixed for static methods, times the row's per-token
gate weight for LoRA-Flow. Fused factors that belong to no adapter (TIES, DARE, LoraHub,
MixLoRA's attention LoRAs) are entries of their own. LoRA-Flow gates of all rows are stacked
for one batched matmul per layer; MixLoRA rows are grouped by plan. A layout is built when
rows join and narrowed by indexing when rows only leave (`layouts.layout_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import native
from .runtime import SHARED_INPUTS, FusionPlan, GroupMember, delta_factors

GROUPS = SHARED_INPUTS[:1] + (("o_proj",),) + SHARED_INPUTS[1:] + (("down_proj",),)


def _entries(delta, dynamic: bool):
    """(key, A (r, d_in), B (d_out, r), coefficient, slot per rank: a list of r, or None) of one
    delta.

    Deltas built from adapters name their parts: those share the adapter's own factors (key:
    the factors object). Anything else is one entry of its own with coefficient 1."""
    if delta.parts:
        for factors, coef, slot in delta.parts:
            yield id(factors), factors.A, factors.B, float(coef), [int(slot)] * factors.rank if dynamic else None
        return
    if isinstance(delta, GroupMember):
        A, B = delta_factors(delta)
        slots = delta.group.slot_of_rank
        slots = None if slots is None else slots[delta.start : delta.end].tolist()
        yield (id(delta.group), delta.start), A, B, 1.0, slots
    else:  # a dynamic delta keeps its per-rank slots; its fixed factor, if any, goes into B
        slots = None if delta.slot_of_rank is None else delta.slot_of_rank.tolist()
        yield id(delta), delta.A, (delta.B if delta.coef is None else delta.B * delta.coef), 1.0, slots


@dataclass
class Table:
    """The deltas of the projections of one layer that read the same input, for all rows: the
    stacked factors. Each row's coefficients over their ranks are kept per layer (`LayerTables`)."""

    A: torch.Tensor  # (R, d_in): every entry's A, module after module
    members: list  # (module, start, end, B transposed: (end - start, d_out), contiguous)
    width: int  # R
    # the C kernel's view of this table (`native.NativeTable`), None where it cannot serve, or
    # False before the first decoding step asks for it
    kernel: object = field(default=False, repr=False, compare=False)

    def apply(self, x: torch.Tensor, ys: dict, scale: torch.Tensor) -> None:
        """x (N, d_in); ys: module -> (N, d_out), updated in place; scale (N, R) per rank.
        A prompt's rows (or any the C kernel does not serve) read A unpacked: an 8-row step
        with A packed for oneDNN (`packed`) was slower, 0.709 against 0.731 of the base step's
        speed (4 interleaved pairs on the 2-core AMD EPYC host; oneDNN pays ~20 us a call, more
        than a (144 x 576) product saves)."""
        if self.start(x, scale, 0, beside=False):
            self.kernel.finish(ys)
        else:
            self._products(x, ys, scale)

    def _products(self, x: torch.Tensor, ys: dict, scale: torch.Tensor) -> None:
        h = F.linear(x, self.A).mul_(scale)  # (N, R)
        for name, start, end, Bt in self.members:
            ys[name].addmm_(h[:, start:end], Bt)  # ys holds each projection's own fresh output

    def start(self, x: torch.Tensor, scales: torch.Tensor, column: int, beside: bool = True) -> bool:
        """Begin the products of a decoding step's few rows in the C kernel (each row multiplies
        only the ranks it uses), on the helper thread where there is one (`native.helper`), so
        that they run while the caller computes the base projections of x; the per-rank scales
        are columns column.. of scales. True if begun: then `finish` must follow, in the same
        thread; False where the torch path serves. beside=False: on the calling thread (the same
        result, bit for bit)."""
        if x.shape[0] > native.MAX_ROWS:
            return False
        kernel = self.kernel
        if kernel is False:
            kernel = self.kernel = native.table_kernel(self.A, self.members)
        return kernel is not None and kernel.start(x, scales, column, native.helper.current() if beside else None)

    def finish(self, started: bool, x: torch.Tensor, ys: dict | None, scales: torch.Tensor, column: int) -> None:
        """Add the products to ys (module -> (N, d_out), the base projections): those `start`
        began, or else computed now. ys None: the base projections failed; drop what began."""
        if started:
            self.kernel.finish(ys)
        elif ys is not None:  # `start` declined: the torch path
            self._products(x, ys, scales[:, column : column + self.width])


@dataclass
class LayerTables:
    """One layer's tables (q/k/v; o; gate/up; down; None where no row has deltas) and every
    row's coefficients over all their ranks side by side, so that one gather and one multiply per
    layer give the per-rank scales of every table. A row that uses a table's entries nowhere has
    coefficients 0 there: it adds exact zeros, which costs less than selecting the rows that use
    the table (the factors are read either way)."""

    tables: list  # Table | None per group of GROUPS
    offsets: list[int]  # each table's first column in coef and slots
    coef: torch.Tensor  # (N, W) fixed coefficient of each rank for each row
    slots: torch.Tensor | None  # (N, W) column of the row's gate table scaling each rank (0: none)

    def scales(self, gates: torch.Tensor) -> torch.Tensor:
        """(N, W): coefficient times, for LoRA-Flow rows, the gate weight of the rank's slot."""
        if self.slots is None:
            return self.coef
        return gates.gather(1, self.slots).mul_(self.coef)

    def start(self, group: int, x: torch.Tensor, scales: torch.Tensor) -> bool:
        """`Table.start` of the group's table (False if it has none)."""
        table = self.tables[group]
        return table is not None and table.start(x, scales, self.offsets[group])

    def finish(self, group: int, started: bool, x: torch.Tensor, ys: dict | None, scales: torch.Tensor) -> None:
        """`Table.finish` of the group's table (nothing if it has none)."""
        table = self.tables[group]
        if table is not None:
            table.finish(started, x, ys, scales, self.offsets[group])

    def select(self, keep: torch.Tensor) -> LayerTables | None:
        """These tables for the rows `keep` (old indices, in order) of their batch; None if none
        of them uses any. The factors are not rebuilt: columns no kept row uses stay, with
        coefficient 0, until the next rebuild; a table no kept row uses is dropped."""
        coef = self.coef.index_select(0, keep)
        tables = [
            None if t is None or not bool(coef[:, o : o + t.width].any()) else t
            for t, o in zip(self.tables, self.offsets)
        ]
        if all(t is None for t in tables):
            return None
        return LayerTables(tables, self.offsets, coef, None if self.slots is None else self.slots.index_select(0, keep))

    def repeat(self, count: int) -> LayerTables:
        """These tables of one row for `count` tokens of that row: its coefficients and slots
        broadcast (views, no copies)."""
        coef = self.coef.expand(count, -1)
        return LayerTables(
            self.tables, self.offsets, coef, None if self.slots is None else self.slots.expand(count, -1)
        )


def _build_table(layer: int, names: tuple[str, ...], plans: list[FusionPlan], device, dtype):
    """(Table, coef (N, R), slots (N, R)) for one group of modules, or None."""
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
            members.append((name, start_of_module, width, torch.cat([B.t() for B in Bs])))
    if not As:
        return None
    coef = [[0.0] * width for _ in range(n)]  # built as lists: indexing tensors here cost ~1 ms a layer
    slots = [[0] * width for _ in range(n)]  # 0: the constant-1 column
    for row, start, end, c, s in assigned:
        coef[row][start:end] = [c] * (end - start)
        if s is not None:
            slots[row][start:end] = [x + 1 for x in s]
    coef, slots = torch.tensor(coef), torch.tensor(slots, dtype=torch.long)
    return Table(torch.cat(As, 0), members, width), coef, slots


def build_tables(layer: int, plans: list[FusionPlan], device, dtype) -> LayerTables | None:
    """The tables of one layer for rows computing with `plans`, or None if no row has deltas."""
    built = [_build_table(layer, names, plans, device, dtype) for names in GROUPS]
    if all(b is None for b in built):
        return None
    offsets, width = [], 0
    for b in built:
        offsets.append(width)
        width += 0 if b is None else b[0].width
    coef = torch.cat([b[1] for b in built if b is not None], 1)
    slots = torch.cat([b[2] for b in built if b is not None], 1)
    dynamic = bool((slots > 0).any())
    return LayerTables(
        [None if b is None else b[0] for b in built],
        offsets,
        coef.to(device, dtype),
        slots.to(device) if dynamic else None,
    )


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
        self.moe_groups: list[tuple[FusionPlan, torch.Tensor | slice, list[int]]] = []
        for plan in {id(plans[i]): plans[i] for i in moe}.values():
            if plan.experts is None:
                raise ValueError(f"method {plan.method!r} replaces the FFN but has no expert tensors to batch")
            members = [i for i in moe if plans[i] is plan]
            self.moe_groups.append((plan, _rows(members, device), members))
        # MixLoRA plans carry no FFN deltas, so their rows are in no FFN table.
        self.tables = [build_tables(layer, plans, device, dtype) for layer in range(layers)]
        self.flow = [i for i, p in enumerate(plans) if p.layer_gate is not None]
        self.flow_token_rows = None  # in a layout of tokens: each LoRA-Flow token's row in the gate stacks
        self.folded = None  # one LoRA-Flow row alone: per layer, its scales as one addmm (`_fold_gate`)
        self.flow_calls: dict = {}  # per layer: the C kernel's gate call (`native.flow_call`), made on first use
        if self.flow:
            self._stack_gates(device, dtype)
            if self.n == 1:
                self.folded = self._fold_gate()

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
                out.moe_groups.append((plan, _rows(kept, self.device), kept))
        rows = set(keep)
        one_row = len(rows) == 1 and len(keep) > 1  # one row's prompt: its coefficients broadcast
        index = torch.tensor(keep[:1] if one_row else keep, dtype=torch.long, device=self.device)
        out.tables = [None if t is None else t.select(index) for t in self.tables]
        if one_row:
            out.tables = [None if t is None else t.repeat(len(keep)) for t in out.tables]
        if self.flow_token_rows is not None:
            raise ValueError("a layout of tokens cannot be narrowed again")
        flow_at = {old: j for j, old in enumerate(self.flow)}
        kept_flow = [flow_at[old] for old in keep if old in flow_at]  # per kept flow row or token
        out.flow = [new for new, old in enumerate(keep) if old in flow_at]
        out.flow_token_rows = None
        out.flow_calls = {}
        out.folded = self.folded if rows == {0} else None
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

    def _fold_gate(self) -> list:
        """For a layout of one LoRA-Flow row, per layer (E (S, W), offset (1, W)) or None, such
        that its per-rank scales are `offset + softmax(logits) @ E`: E[s, w] is the fixed
        coefficient of rank w if the gate's slot s scales it, offset holds the coefficients of
        ranks no slot scales plus `b @ E`. One addmm in place of adding b, padding, gathering
        and multiplying: 3 fewer small kernels a layer for a lone LoRA-Flow row. Equal to
        `LayerTables.scales` up to rounding: (p + b) c there, p c + b c here."""
        out = []
        for layer, tables in enumerate(self.tables):
            if tables is None or tables.slots is None:
                out.append(None)
                continue
            slots, coef = tables.slots[0], tables.coef[0]  # (W,)
            E = torch.stack([torch.where(slots == s + 1, coef, 0.0) for s in range(self.gate_width)])  # (S, W)
            offset = torch.where(slots == 0, coef, 0.0) + self.gate_b[layer][0] @ E  # (W,)
            out.append((E, offset.unsqueeze(0)))
        return out

    def scales(self, layer: int, x: torch.Tensor, record: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x (N, d) the residual stream entering the layer -> (the LoRA-Flow rows' gate weights
        (n_flow, S), or None when there are none or, for a lone LoRA-Flow row, when no row
        records them; every row's per-rank scales (N, W), or None when the layer has no table)."""
        tables = self.tables[layer]
        if not self.flow:
            return None, None if tables is None else tables.coef
        if self.folded is None:
            if self.flow_token_rows is None:  # one token per row: the C kernel, where it serves
                call = self.flow_calls.get(layer, False)
                if call is False:
                    call = self.flow_calls[layer] = native.flow_call(
                        self.n,
                        x.shape[1],
                        self.flow_rows,
                        self.gate_W[layer],
                        self.gate_b[layer],
                        self.gate_mask,
                        self.gate_temps,
                        None if tables is None else tables.coef,
                        None if tables is None else tables.slots,
                    )
                done = None if call is None else call.run(x)
                if done is not None:
                    return done
            weights, gates = self.gate(layer, x)
            return weights, None if tables is None else tables.scales(gates)
        logits = F.linear(x, self.gate_W[layer][0])  # (N, S): every row or token is the LoRA-Flow row's
        if self.gate_temps is not None:
            logits = logits / self.gate_temps
        probs = torch.softmax(logits, dim=-1)
        weights = probs + self.gate_b[layer] if record else None
        fold = self.folded[layer]
        if tables is None or fold is None:
            return weights, None if tables is None else tables.coef
        return weights, torch.addmm(fold[1], probs, fold[0])

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
        if len(self.flow) == self.n:  # every row (or token) is a LoRA-Flow one, in order
            return weights, F.pad(weights, (1, 0), value=1.0)
        table = x.new_ones(self.n, self.gate_width + 1)
        table.index_copy_(0, self.flow_rows, F.pad(weights, (1, 0), value=1.0))
        return weights, table


def _rows(members: list[int], device) -> torch.Tensor | slice:
    """A group's rows: a slice where they are consecutive (views instead of copies), else an index."""
    if members == list(range(members[0], members[0] + len(members))):
        return slice(members[0], members[0] + len(members))
    return torch.tensor(members, dtype=torch.long, device=device)
