"""The preference losses against TRL's ``DPOTrainer`` code on the same per-token log-probabilities: loss and
gradients within 1e-6 for sigmoid and ipo (TRL's own branches of ``DPOTrainer._compute_loss``, called on a stub
trainer whose model returns the given log-probs), and for dpop against TRL's sigmoid with DPO-Positive's penalty
folded into the reference log-prob of the rejected answer (TRL has no dpop). Plus the metrics' definitions."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from chatmusician.train.dpo_loss import chosen_nll, pair_losses, pair_stats, sequence_logps

B, T = 3, 7  # pairs, completion positions


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    per_token = (-torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()  # [2B, T]
    mask = torch.ones(2 * B, T + 1, dtype=torch.long)  # completion_mask over input_ids (shifted: T)
    mask[:, :2] = 0  # prompt tokens
    mask[1, -2:] = 0  # ragged answers: padding
    mask[B + 2, -3:] = 0
    ref = (-torch.rand(2 * B, generator=g, dtype=torch.float64) * 12).detach()
    return per_token, mask, ref


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def trl_loss(
    per_token, completion_mask, ref_chosen, ref_rejected, loss_type: str, beta: float, sft_weight=0.0
):
    """TRL 1.x's ``DPOTrainer._compute_loss`` itself on a stub trainer: the model returns ``per_token``
    (already masked) as its fused-head log-probs, references precomputed."""
    from trl.trainer.dpo_trainer import DPOTrainer

    shift = completion_mask[:, 1:].to(per_token.dtype)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token * shift, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool())  # fmt: skip

    def model(**kwargs):
        return outputs

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type, "sft"][: 1 + bool(sft_weight)],
        loss_weights=[1.0, sft_weight][: 1 + bool(sft_weight)],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}  # fmt: skip
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False), stub._metrics["train"]


def ours(per_token, completion_mask, ref, loss: str, beta: float, lam: float = 0.0):
    shift = completion_mask[:, 1:].to(per_token.dtype)
    logps = (per_token * shift).sum(dim=1)
    counts = completion_mask.sum(dim=1)  # TRL's ipo divides by the completion tokens of input_ids
    losses = pair_losses(logps[:B], logps[B:], ref[:B], ref[B:], loss, beta, lam, counts[:B], counts[B:])
    return losses.mean(), logps


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_gradients_equal_trl(loss, beta):
    per_token, mask, ref = _inputs(seed=1)
    expected, metrics = trl_loss(per_token, mask, ref[:B], ref[B:], loss, beta)
    (expected_grad,) = torch.autograd.grad(expected, per_token)
    got, logps = ours(per_token, mask, ref, loss, beta)
    (got_grad,) = torch.autograd.grad(got, per_token)
    assert abs(got.item() - expected.item()) < 1e-6 and got.item() > 0
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=0) and got_grad.abs().max() > 1e-3
    # the logged metrics agree with TRL's definitions too
    stats = pair_stats(torch.zeros(B), logps[:B], logps[B:], ref[:B], ref[B:], beta)
    assert abs(float(stats[1] / B) - metrics["rewards/margins"][0]) < 1e-9
    assert abs(float(stats[2] / B) - metrics["rewards/accuracies"][0]) < 1e-7  # TRL: float32
    assert abs(float(stats[3] / B) - metrics["logps/chosen"][0]) < 1e-9


@pytest.mark.parametrize("lam", [0.0, 10.0])
def test_dpop_equals_trl_sigmoid_with_the_positive_penalty(lam):
    """DPO-Positive (Pal et al. 2024, eq. 3): the penalty lam * max(0, ref_c - pi_c) inside the sigmoid equals TRL's
    sigmoid with ref_rejected lowered by it (its gradient flows through pi_c as the paper's does)."""
    per_token, mask, ref = _inputs(seed=2)
    with torch.no_grad():  # make the penalty active for some pairs, inactive for others
        ref[0] = (per_token[0] * mask[0, 1:]).sum() + 2.0
        ref[1] = (per_token[1] * mask[1, 1:]).sum() - 2.0
    got, logps = ours(per_token, mask, ref, "dpop", 0.1, lam)
    (got_grad,) = torch.autograd.grad(got, per_token)
    chosen = (per_token[:B] * mask[:B, 1:]).sum(
        dim=1
    )  # a fresh graph: the penalty's gradient flows into TRL's
    penalty = torch.clamp(ref[:B] - chosen, min=0)
    expected, _ = trl_loss(per_token, mask, ref[:B], ref[B:] - lam * penalty, "sigmoid", 0.1)
    (expected_grad,) = torch.autograd.grad(expected, per_token)
    assert abs(got.item() - expected.item()) < 1e-6
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=0)
    if lam:  # the penalty changes the loss (pair 0 is penalised): this is not plain DPO
        plain, _ = ours(per_token, mask, ref, "sigmoid", 0.1)
        assert got.item() > plain.item() + 1e-3


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_chosen_nll_term_equals_trls_sft_loss_type(loss):
    """RPO: the loss plus sft_weight x the chosen answers' NLL per token equals TRL's loss_type [loss, "sft"]
    with loss_weights [1, sft_weight], loss and gradients (the ragged chosen answers weighted by their tokens)."""
    per_token, mask, ref = _inputs(seed=3)
    expected, _ = trl_loss(per_token, mask, ref[:B], ref[B:], loss, 0.1, sft_weight=0.5)
    (expected_grad,) = torch.autograd.grad(expected, per_token)
    got, logps = ours(per_token, mask, ref, loss, 0.1)
    got = got + 0.5 * chosen_nll(logps[:B], mask[:B, 1:].sum(dim=1))
    (got_grad,) = torch.autograd.grad(got, per_token)
    plain, _ = ours(per_token, mask, ref, loss, 0.1)
    assert abs(got.item() - expected.item()) < 1e-6 and got.item() > plain.item() + 0.1
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=0)


def test_sequence_logps_sums_answer_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    logps, counts = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    assert counts.tolist() == [3, 2]
    assert torch.allclose(logps[0], lp[0, 1, 3] + lp[0, 2, 4] + lp[0, 3, 5])
    assert torch.allclose(logps[1], lp[1, 0, 7] + lp[1, 1, 8])


def test_unknown_loss_is_one_clear_error():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss must be one of sigmoid, dpop, ipo"):
        pair_losses(x, x, x, x, "kto", 0.1)
