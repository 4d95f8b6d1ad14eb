"""Which layout (`batch_layout.Layout`) a batch computes with: the current one, narrowed when
rows only leave, or a new one; and the last few one-row layouts, kept for reuse."""

from __future__ import annotations

from collections import OrderedDict

from .batch_layout import Layout
from .runtime import FusionPlan

SOLO_LAYOUTS_KEPT = 4  # one-row layouts kept for reuse (`Layouts`)


def layout_for(model, current: tuple[tuple, Layout] | None, plans: list[FusionPlan]) -> tuple[tuple, Layout]:
    """(key, layout) for a batch whose rows compute with `plans`, given the current one: the
    current layout, or when rows have only left it, the current one narrowed to the remaining
    rows (cheap), or a new one when rows joined or the batch has shrunk below half the rows its
    tables were built for."""
    key = tuple(id(p) for p in plans)
    if current is not None:
        old_key, old = current
        if old_key == key:
            return current
        keep, j = [], 0
        for k in key:
            while j < len(old_key) and old_key[j] != k:
                j += 1
            if j == len(old_key):
                break
            keep.append(j)
            j += 1
        if len(keep) == len(key) and 2 * len(keep) >= old.built_rows:
            return key, old.select(keep)
    return key, Layout(model, plans)


class Layouts:
    """The layout of the running batch, and the last few one-row layouts: a fusion used alone
    again (a user's next message, or users taking turns) reuses its tables instead of rebuilding
    them (~17 ms for a LoRA-Flow k=2 row on the embedded model, 4 % of a 128-token prefill). A
    kept layout holds its plans, so the plan ids in its key cannot be reused by other plans."""

    def __init__(self, keep: int = SOLO_LAYOUTS_KEPT):
        self.keep = keep
        self.current: tuple[tuple, Layout] | None = None
        self.solo: OrderedDict[tuple, Layout] = OrderedDict()

    def get(self, model, plans: list[FusionPlan]) -> Layout:
        key = tuple(id(p) for p in plans)
        kept = self.solo.get(key)
        if kept is not None:
            self.solo.move_to_end(key)
            self.current = key, kept
            return kept
        self.current = layout_for(model, self.current, plans)
        layout = self.current[1]
        if layout.built_rows == 1 and self.keep:
            self.solo[key] = layout
            while len(self.solo) > self.keep:
                self.solo.popitem(last=False)
        return layout

    def release(self) -> None:
        """The batch is empty: its layout goes; the one-row layouts stay."""
        self.current = None
