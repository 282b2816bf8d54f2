"""Per-pair offline preference losses (DPO and relatives), plus KTO for unpaired data.

Every registered loss takes the summed log-probs of the chosen and rejected responses under the policy and under
a frozen reference, all [B] (B pairs), and returns one loss per pair [B]; reducing them is the caller's job.
With logits = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
  sigmoid  DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta * logits). With label_smoothing eps > 0 it is
           cDPO (Mitchell 2023): the preference label is taken to be flipped with probability eps.
  robust   rDPO (Chowdhury et al. 2024): an unbiased loss under label-flip rate eps < 0.5.
  hinge    SLiC (Zhao et al. 2023): relu(1 - beta * logits); beta plays the part of 1 / margin.
  ipo      IPO (Azar et al. 2023, eq. 17): (logits - 1 / (2 beta))^2, beta is the paper's tau.
  simpo    SimPO (Meng et al. 2024, eq. 6): reference-free; the caller passes length-normalised AVERAGE log-probs
           and the ref arguments are ignored.
Departures from the papers: IPO is computed on summed log-probs as for DPO (TRL averages them per token);
SimPO accepts the same cDPO label smoothing as sigmoid (eps = 0 gives the paper). The RPO term (Pang et al. 2024,
`rpo_nll`) is added by the caller with weight alpha.

KTO (Ethayarajh et al. 2024) takes one response per example and a reference point, so it is a plain
function outside the registry. Departure: the reference point z0 is a detached batch estimate, the mean
log-ratio over mismatched prompt/completion pairs clamped at 0 (as in the paper and TRL), not the true
KL(pi || ref); the caller builds the mismatched pairs.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss and what it needs from its caller. loss(chosen, rejected, ref_chosen, ref_rejected, *,
    beta, **options) -> [B]; options: its own hyper-parameters, by their DPOConfig names; needs_reference: False
    when the ref arguments are ignored (no reference stage runs, zeros are passed); length_normalized: chosen and
    rejected are average log-probs per token instead of sums."""

    loss: Callable[..., Tensor]
    options: tuple[str, ...] = ()
    needs_reference: bool = True
    length_normalized: bool = False


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def preference_loss(name: str, **declared) -> Callable:
    """Register the decorated loss under `name` with what it declares (`PreferenceLoss`'s fields)."""
    def add(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"duplicate preference loss {name!r}")
        PREFERENCE_LOSSES[name] = PreferenceLoss(loss, **declared)
        return loss
    return add


def _logits(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor) -> Tensor:
    """DPO's log-ratio margin (chosen - ref_chosen) - (rejected - ref_rejected). all: [B] -> [B]"""
    assert chosen_logps.shape == rejected_logps.shape == ref_chosen_logps.shape == ref_rejected_logps.shape, (
        chosen_logps.shape, rejected_logps.shape, ref_chosen_logps.shape, ref_rejected_logps.shape)
    assert chosen_logps.dim() == 1, chosen_logps.shape
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


@preference_loss("sigmoid", options=("label_smoothing",))
def sigmoid_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                 *, beta: float, label_smoothing: float) -> Tensor:
    """DPO loss -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h = logits (DPO eq. 7; cDPO for eps > 0).
    all: [B] -> [B]"""
    logits = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)


@preference_loss("robust", options=("label_smoothing",))
def robust_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                *, beta: float, label_smoothing: float) -> Tensor:
    """rDPO loss (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps) (Chowdhury et al. 2024).
    all: [B] -> [B]; eps = label_smoothing must be < 0.5."""
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    logits = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # unlike cDPO the eps term enters with a + sign: it debiases the loss rather than smoothing it
    return (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)


@preference_loss("hinge")
def hinge_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               *, beta: float) -> Tensor:
    """SLiC hinge loss relu(1 - beta h) (Zhao et al. 2023). all: [B] -> [B]"""
    logits = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * logits)  # zero gradient once the margin 1 / beta is reached


@preference_loss("ipo")
def ipo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             *, beta: float) -> Tensor:
    """IPO loss (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17; beta = tau). all: [B] -> [B]"""
    logits = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (logits - 1 / (2 * beta)) ** 2  # regresses the margin to a target, so it cannot overfit to +inf


@preference_loss("simpo", options=("label_smoothing", "simpo_gamma"), needs_reference=False,
                 length_normalized=True)
def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               *, beta: float, label_smoothing: float, simpo_gamma: float) -> Tensor:
    """SimPO loss -log sigma(beta (avg_w - avg_l) - gamma) (Meng et al. 2024, eq. 6; gamma = simpo_gamma, the
    number TRL's CPOConfig.simpo_gamma is), with cDPO smoothing eps.
    chosen_logps, rejected_logps: AVERAGE log-probs [B] -> [B]; the ref arguments are ignored (reference-free)."""
    assert chosen_logps.shape == rejected_logps.shape and chosen_logps.dim() == 1, (
        chosen_logps.shape, rejected_logps.shape)
    logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def implicit_rewards(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta * (log pi - log ref) (Rafailov et al. 2023), detached: a metric only.
    logps, ref_logps: [B] -> [B]"""
    assert logps.shape == ref_logps.shape, (logps.shape, ref_logps.shape)
    return (beta * (logps - ref_logps)).detach()


def pair_comparison(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Per pair: both rewards, the margin chosen - rejected and accuracy (margin > 0; a tie counts as wrong), as
    float tensors for metrics (detached). chosen_rewards, rejected_rewards: [P] -> each [P]"""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {"chosen": chosen, "rejected": rejected, "margin": chosen - rejected,
            "accuracy": (chosen > rejected).float()}


def rpo_nll(chosen_logps_sum: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token NLL of each chosen response, -sum log pi / length (the RPO term, Pang et al. 2024).
    chosen_logps_sum: [B], chosen_lengths: [B] (token counts) -> [B]"""
    assert chosen_logps_sum.shape == chosen_lengths.shape, (chosen_logps_sum.shape, chosen_lengths.shape)
    return -chosen_logps_sum / chosen_lengths.clamp_min(1)  # clamp: an empty response gives 0, not NaN


def kto_reference_point(mismatched_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's reference point z0: mean log-ratio over mismatched prompt/completion pairs, detached, clamped at 0
    (Ethayarajh et al. 2024). mismatched_logps, mismatched_ref_logps: [B] (summed) -> []"""
    assert mismatched_logps.shape == mismatched_ref_logps.shape, (mismatched_logps.shape, mismatched_ref_logps.shape)
    return (mismatched_logps - mismatched_ref_logps).mean().detach().clamp(min=0)  # a KL estimate is never < 0


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_ref_point: Tensor, *, beta: float,
             desirable_weight: float, undesirable_weight: float) -> Tensor:
    """KTO loss lambda_D (1 - sigma(beta (r - z0))) for desirable and lambda_U (1 - sigma(beta (z0 - r))) for
    undesirable examples, r = log pi - log ref (Ethayarajh et al. 2024).
    logps, ref_logps: [B] (summed), desirable: [B] bool, kl_ref_point: [] -> [B]"""
    assert logps.shape == ref_logps.shape == desirable.shape and desirable.dtype == torch.bool, (
        logps.shape, ref_logps.shape, desirable.shape, desirable.dtype)
    assert kl_ref_point.dim() == 0, kl_ref_point.shape
    log_ratio = logps - ref_logps
    z0 = kl_ref_point.detach().clamp(min=0)  # no gradient through z0: it only sets where the value function bends
    gain = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    loss_aversion = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    return torch.where(desirable, gain, loss_aversion)
