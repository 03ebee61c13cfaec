"""Locality: does the edited model still answer unrelated prompts as the unedited model did?

Scored teacher-forced on the unedited model's greedy answers (see ``docs/faithful.md``):

* agreement: share of answer positions where the edited model's argmax is the unedited model's argmax;
* KL: mean next-token KL(unedited ‖ edited) over the same positions, on the unedited distribution's
  top-``k`` tokens plus one bucket for the rest of the vocabulary. That is the exact KL of the two
  distributions coarsened to ``k + 1`` outcomes: a lower bound of the full KL, equal to it up to the
  mass outside the top ``k`` (under 1 % for SmolLM2 at ``k = 256``), and exactly 0 for an unchanged model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from .forced import FORCED_BATCH_SIZE, ForcedItem, SharedPrefix, TopK, forced_logprobs


def coarse_kl(reference: TopK, logp: Tensor) -> Tensor:
    """Per-position KL(reference ‖ edited) over the reference's top-k tokens plus a rest bucket ``[T]``."""
    ref = reference.logp.to(logp.device, torch.float64)
    edited = logp.gather(-1, reference.ids.to(logp.device)).to(torch.float64)
    p = ref.exp()
    head = (p * (ref - edited)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - edited.exp().sum(-1)).clamp(min=1e-30)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-30).log() - q_rest.log()), 0.0)
    return head + rest


class LocalityAgreement(Metric):
    """Pooled over answer positions: ``{"agreement": top-1 agreement, "kl": mean KL}`` (NaN before any update)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kl", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positions", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logp: Tensor, reference: TopK) -> None:
        """``logp``: the edited model's log-probabilities ``[T, vocab]`` at one answer's positions."""
        if logp.shape[0] != reference.ids.shape[0]:
            raise ValueError(
                f"{logp.shape[0]} positions scored but the reference has {reference.ids.shape[0]}"
            )
        top1 = reference.ids[:, 0].to(logp.device)
        self.agree += (logp.argmax(-1) == top1).sum().to(torch.float64)
        self.kl += coarse_kl(reference, logp).sum().to(self.kl.device)
        self.positions += float(logp.shape[0])

    def compute(self) -> dict[str, Tensor]:
        n = self.positions
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        return {
            "agreement": self.agree / n if n > 0 else nan,
            "kl": (self.kl / n).clamp(min=0.0) if n > 0 else nan,
        }


def score_locality(
    model: torch.nn.Module,
    items: Sequence[ForcedItem],
    references: Sequence[TopK | None],
    metric: LocalityAgreement | None = None,
    batch_size: int = FORCED_BATCH_SIZE,
    prefix: SharedPrefix | None = None,
) -> LocalityAgreement:
    """Update ``metric`` (a new one by default) with the model's teacher-forced pass over ``items``.

    Use the same ``items``, ``batch_size`` and prefix ids as for the references: identical batches are
    what make an unchanged model score agreement 1 and KL 0 exactly.
    """
    # per-edit scores: a DDP rank must not average its edit's score with another rank's
    metric = metric if metric is not None else LocalityAgreement(sync_on_compute=False)
    for i, logp in forced_logprobs(model, items, batch_size, prefix):
        reference = references[i]
        if reference is not None:
            metric.update(logp, reference)
    return metric
