"""Preference losses on sequence log-probabilities (pure torch; no Ray, no DeepSpeed).

A pair's chosen and rejected answers go through the model in one forward pass (rows ``[chosen..., rejected...]``,
prompt tokens masked with -100); :func:`sequence_logps` sums each row's answer-token log-probabilities. With
``r_c = logp_policy(chosen) - logp_ref(chosen)`` and ``r_r`` likewise (the implicit rewards over beta):

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta (r_c - r_r))``;
* ``dpop`` (DPO-Positive, Pal et al. 2024, eq. 3; NotaGen's stage 3 with beta 0.1, lambda 10):
  ``-log sigmoid(beta (r_c - r_r - lambda max(0, logp_ref(chosen) - logp_policy(chosen))))``: DPO may lower the
  chosen answer's likelihood as long as the rejected one falls faster; the penalty stops that;
* ``ipo`` (Azar et al. 2023, eq. 17, in TRL's per-token form): ``(r_c / n_c - r_r / n_r - 1 / (2 beta))^2`` with
  ``n`` the answer's token count.

Any of them plus ``sft_weight`` times :func:`chosen_nll` (the chosen answers' mean per-token negative log-prob:
RPO, Pang et al. 2024; TRL's ``loss_type=[..., "sft"]``): it keeps raising the chosen answers' likelihood, so
chosen answers the model would not write itself (constrained ones) are learnt, not only ranked.

TRL's ``DPOTrainer`` computes the same sigmoid, ipo and sft losses (tests/test_dpo_loss.py checks loss and
gradients against its code); TRL has no dpop.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def sequence_logps(logits, labels):
    """(sum of the target tokens' log-probabilities [N], target token counts [N]) of each row: HF's next-token
    shift, labels -100 = not scored. ``logits`` [N, T, V], ``labels`` [N, T]."""
    import torch.nn.functional as F

    # Shift the labels, not the logits (as HF's loss does): no copy of the [N, T, V] logits.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [N, T]: row t's target is token t+1
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)  # [N, T], 0 where ignored
    return -nll.sum(dim=1), mask.sum(dim=1)


def pair_losses(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    loss: str,
    beta: float,
    dpop_lambda: float = 0.0,
    chosen_tokens=None,
    rejected_tokens=None,
):
    """Per-pair loss [B] of one of :data:`chatmusician.train.config.DPO_LOSSES` (ipo needs the token counts)."""
    import torch
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen  # [B]
    rejected_ratio = policy_rejected - ref_rejected
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss == "dpop":
        penalty = torch.clamp(ref_chosen - policy_chosen, min=0.0)
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio - dpop_lambda * penalty))
    if loss == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss must be one of sigmoid, dpop, ipo, got {loss!r}")


def chosen_nll(policy_chosen, chosen_tokens):
    """The chosen answers' negative log-prob per token over the micro batch (TRL's ``sft`` term)."""
    return -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)


STAT_NAMES = ("loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected", "kl_estimate")
"""What :func:`pair_stats` sums (before the pair count), as the metric names a step logs."""


def pair_stats(losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sums of the logged quantities over the pairs, as a float64 tensor [7]: loss; reward margin
    ``beta (r_c - r_r)``; reward accuracy (``r_c > r_r``); chosen / rejected log-probs; the KL estimate
    ``(r_c + r_r) / 2`` (mean log pi / pi_ref over both answers: an unbiased KL(pi || pi_ref) estimate for
    answers drawn from pi, a drift measure otherwise); the pair count."""
    import torch

    c = (policy_chosen - ref_chosen).detach().double()
    r = (policy_rejected - ref_rejected).detach().double()
    return torch.stack(
        [
            losses.detach().double().sum(),
            (beta * (c - r)).sum(),
            (c > r).double().sum(),
            policy_chosen.detach().double().sum(),
            policy_rejected.detach().double().sum(),
            ((c + r) / 2).sum(),
            torch.tensor(float(len(c)), dtype=torch.float64, device=c.device),
        ]
    )
