"""`lorahub`: LoraHub (Huang et al. 2023).

One scalar per LoRA, combined element-wise as A = sum_i w_i A_i and B = sum_i w_i B_i (so the
product has cross terms; equal ranks required). The weights are fitted gradient-free with
nevergrad's NGOpt: init 0, bounds +-1.5, budget 40, objective = few-shot loss + 0.05 * mean|w|,
as in the reference implementation, whose few-shot loss is normalised in its own way (see
`few_shot_loss`): the L1 term is weighed against that, not against a plain mean cross-entropy.
"""

import time
import warnings

import torch
import torch.nn.functional as F

from ..errors import FusionError
from ..runtime import FusionPlan, LowRankDelta, Run, activate
from ..training import Progress, collate
from .base import BuildContext, FitResult, FusionMethod, module_keys, resolve_weights, slot_weights_param

L1_COEF = 0.05


@torch.no_grad()
def few_shot_loss(model, run, examples, pad_id: int, device, batch_size: int | None = None, chunk: int = 8) -> float:
    """The reference's objective: the examples in batches of `batch_size` (default: all in one),
    each batch's mean token cross-entropy over its answer tokens, summed over the batches and
    divided by the number of examples. With one batch that is the mean cross-entropy / N, so
    the 0.05 * mean|w| penalty carries N times the weight it has against a plain mean."""
    batch_size = batch_size or len(examples)
    total = 0.0
    for first in range(0, len(examples), batch_size):
        batch = examples[first : first + batch_size]
        loss_sum, count = 0.0, 0
        for start in range(0, len(batch), chunk):  # same value as one forward, bounded memory
            ids, attention, labels = collate(batch[start : start + chunk], pad_id, device)
            with activate(run):
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
            loss_sum += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels[:, 1:] != -100).sum())
        total += loss_sum / max(count, 1)
    return total / len(examples)


class LoraHubMethod(FusionMethod):
    name = "lorahub"
    pretty_name = "LoraHub"
    kind = "static"
    reference_url = "https://arxiv.org/abs/2307.13269"
    description = "One weight per LoRA on the factors (A and B summed separately), fitted gradient-free."
    params = (slot_weights_param("One weight per adapter; default 1/k each (fit to learn them)."),)
    min_adapters = 1
    fittable = True

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        weights = resolve_weights(params.get("weights"), len(adapters), None, self.name)
        ranks = {f.rank for a in adapters for f in a.factors.values()}
        scales = {round(f.scale, 9) for a in adapters for f in a.factors.values()}
        if len(ranks) > 1 or len(scales) > 1:
            raise FusionError(
                "lorahub sums the A and B factors element-wise, so all adapters need the "
                f"same rank and alpha/r; got ranks {sorted(ranks)} and scales {sorted(scales)}"
            )
        deltas = {}
        for key in module_keys(adapters):
            present = [(a.factors[key], w) for a, w in zip(adapters, weights) if key in a.factors]
            A = sum(w * f.A for f, w in present)  # (r, d_in)
            B = sum(w * f.B for f, w in present) * present[0][0].scale  # (d_out, r)
            deltas[key] = LowRankDelta(A.to(ctx.device, ctx.dtype), B.to(ctx.device, ctx.dtype))
        static = torch.tensor(weights, dtype=torch.float32).expand(ctx.num_layers, -1).clone()
        return FusionPlan(method=self.name, slot_names=[a.name for a in adapters], deltas=deltas, static_weights=static)

    def fit(self, ctx, adapters, examples, params, options, on_progress=None, cancel=None) -> FitResult:
        import nevergrad as ng

        k = len(adapters)
        budget = int(options.get("budget", 40))
        seed = int(options.get("seed", 0))
        batch_size = options.get("batch_size")
        parametrization = ng.p.Array(init=[0.0] * k, upper=[1.5] * k, lower=[-1.5] * k)
        parametrization.random_state.seed(seed)
        optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
        losses: list[float] = []
        best = (float("inf"), [0.0] * k)
        start = time.perf_counter()
        for step in range(budget):
            if cancel is not None and cancel.is_set():
                break
            with warnings.catch_warnings():  # NGOpt's inner COBYLA warns about its own default tolerance
                warnings.filterwarnings("ignore", message=".*Invalid RHOEND.*", category=UserWarning)
                candidate = optimizer.ask()
            weights = [float(v) for v in candidate.value]
            plan = self.build(ctx, adapters, {"weights": weights})
            loss = few_shot_loss(ctx.model, Run(plan), examples, options["pad_id"], ctx.device, batch_size)
            score = loss + L1_COEF * sum(abs(w) for w in weights) / k
            optimizer.tell(candidate, score)
            losses.append(score)
            if score < best[0]:
                best = (score, weights)
            if on_progress is not None:
                on_progress(Progress(step + 1, budget, score, 0.0, time.perf_counter() - start, 0, losses))
        recommended = [float(v) for v in optimizer.provide_recommendation().value] if losses else best[1]
        return FitResult(
            losses=losses,
            params={"weights": recommended},
            meta={
                "best_score": best[0],
                "budget": budget,
                "objective": "reference: sum of batch mean CE / examples + 0.05 * mean|w|",
            },
        )
