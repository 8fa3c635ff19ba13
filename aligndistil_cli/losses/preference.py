"""The paper's preference-optimisation baselines beside DPO: SimPO and TDPO.

Pure functions of per-sequence quantities, mean over the batch; B = batch of pairs. DPO itself is
losses.functions.dpo_loss. Each sigmoid is taken in float32 at least (bf16 inputs are promoted, as in
DPO; float64 inputs stay float64).

- SimPO (Meng et al., NeurIPS 2024, arXiv 2405.14734): no reference model; the reward of y is
  beta * (1/|y|) * log pi(y|x), and L = -log sigmoid(r_w - r_l - gamma). gamma is the target
  reward margin itself, as TRL's CPOConfig.simpo_gamma is (TRL computes
  beta * (a_w - a_l - simpo_gamma / beta)); the SimPO repository and the AlignDistil scripts give
  gamma_beta_ratio = gamma / beta instead.
- TDPO (Zeng et al., ICML 2024, arXiv 2404.11999): with
  u = beta log(pi(y_w)/ref(y_w)) - beta log(pi(y_l)/ref(y_l)) and the sequential KL
  D(x, y) = sum_t KL(ref(.|x, y_<t) || pi(.|x, y_<t)) over the response positions,
  TDPO1: L = -log sigmoid(u - beta (D_l - D_w));
  TDPO2: L = -log sigmoid(u - alpha (beta D_l - sg(beta D_w))): the stop-gradient is on the
  chosen response's KL, as in the paper and its official trainers.py (tdpo_loss:
  alpha * (chosen_position_kl.detach() - rejected_position_kl)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TDPO_VERSIONS = ("tdpo1", "tdpo2")


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.5,
               gamma: float = 1.25) -> torch.Tensor:
    """SimPO loss, mean over the batch.

    chosen_avg_logps, rejected_avg_logps [B]: (1/|y|) sum_t log pi(y_t | x, y_<t) over each
    response's tokens (EOS included). L = -log sigmoid(beta * (a_w - a_l) - gamma).
    """
    return -F.logsigmoid(beta * _at_least_float32(chosen_avg_logps - rejected_avg_logps) - gamma).mean()


def tdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    version: str = "tdpo2",
) -> torch.Tensor:
    """TDPO1 or TDPO2 loss (version "tdpo1" or "tdpo2"), mean over the batch.

    Log-probs [B] summed over response tokens, as DPO's; chosen_kl, rejected_kl [B] the
    sequential KLs D(x, y; ref || pi). alpha is TDPO2's; TDPO1 has none.
    """
    check_version(version)
    u = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    if version == "tdpo1":
        delta = beta * (rejected_kl - chosen_kl)
    else:
        delta = alpha * (beta * rejected_kl - (beta * chosen_kl).detach())
    return -F.logsigmoid(_at_least_float32(u - delta)).mean()


def tdpo_kl_weights(version: str, alpha: float) -> tuple[float, float]:
    """(chosen, rejected): the gradient of TDPO's sigmoid argument u - delta with respect to each
    response's sequential KL, divided by beta. A fused pass that weighs the chosen response's
    log-probs by +1, the rejected one's by -1 and their per-position KLs by these has, per pair, the
    gradient of (u - delta) / beta; TDPO2's stop-gradient makes the chosen weight 0."""
    check_version(version)
    return (1.0, -1.0) if version == "tdpo1" else (0.0, -alpha)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_version(version: str) -> None:
    if version not in TDPO_VERSIONS:
        raise ValueError(f"unknown TDPO version {version!r}; choose one of {', '.join(TDPO_VERSIONS)}")
