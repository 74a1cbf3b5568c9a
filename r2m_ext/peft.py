"""A drop-in for PEFT's `add_weighted_adapter` (peft 0.21.2) whose `svd` combination never forms
a module's m x n update.

PEFT's `svd` builds each module's dense delta sum_i w_i s_i B_i A_i and runs a full
`torch.linalg.svd` of it. That matrix has rank at most R = sum_i r_i and is a product of known
factors, [w_1 s_1 B_1 | ... ] (m x R) times [A_1; ...] (R x n): a QR of each side and an SVD
of the R x R core give the same truncated SVD exactly, in O((m + n) R^2) instead of
O(m n min(m, n)). Everything else is PEFT's: the new adapter's config (r = lora_alpha =
svd_rank, default the largest rank), which modules get it, `svd_clamp` on U diag(S) and Vh.
The other combination types (their elementwise TIES/DARE/pruning parts need the dense delta)
and convolution layers are PEFT's own code, called as is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Embedding, Linear
from peft.utils import _freeze_adapter, _get_submodules


def _lora_model(model: Any):
    return model.base_model if isinstance(model, PeftModel) else model


def _factors(target: LoraLayer, adapters, weights) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([w_i s_i B_i] m x R, [A_i] R x n) of the adapters on this layer, in float64, laid out
    as the new adapter's B @ A (PEFT's delta before its fan_in_fan_out/embedding transposes)."""
    lefts, rights = [], []
    for adapter, weight in zip(adapters, weights, strict=True):
        if adapter in target.lora_A:
            a, b = target.lora_A[adapter].weight, target.lora_B[adapter].weight
        elif adapter in target.lora_embedding_A:
            a, b = target.lora_embedding_A[adapter], target.lora_embedding_B[adapter]
        else:
            continue
        lefts.append(b.detach().double() * (weight * target.scaling[adapter]))
        rights.append(a.detach().double())
    if not lefts:
        return None
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)


def factored_truncated_svd(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` SVD (U [m, rank], S [rank], Vh [rank, n]) of left @ right (m x R times
    R x n) without forming it: left = Q_l R_l, right^T = Q_r R_r, SVD of R_l R_r^T. Where the
    product has fewer than `rank` singular triplets, the rest are zero."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.T)
    u = q_left @ u_core
    vh = vh_core @ q_right.T
    kept = min(rank, s.shape[0])
    m, n = left.shape[0], right.shape[1]
    u_out = torch.zeros(m, rank, dtype=u.dtype, device=u.device)
    vh_out = torch.zeros(rank, n, dtype=u.dtype, device=u.device)
    s_out = torch.zeros(rank, dtype=u.dtype, device=u.device)
    u_out[:, :kept], s_out[:kept], vh_out[:kept] = u[:, :kept], s[:kept], vh[:kept]
    return u_out, s_out, vh_out


def add_weighted_adapter(
    model,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """PEFT's `LoraModel.add_weighted_adapter` (same arguments, same meaning, same new adapter
    up to the sign and rotation freedom of singular vectors), on a PeftModel or its LoraModel;
    `combination_type="svd"` in factored form (module docstring)."""
    lora = _lora_model(model)
    if combination_type != "svd":
        lora.add_weighted_adapter(
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        return
    if adapter_name in lora.peft_config:
        return  # as PEFT: an existing adapter is left alone
    combination_type, new_rank, new_target_modules = lora._check_add_weighted_adapter(
        adapters=adapters, combination_type=combination_type, svd_rank=svd_rank
    )
    # The new adapter's config and modules, as PEFT sets them up.
    lora.peft_config[adapter_name] = replace(
        lora.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_target_modules,
        alpha_pattern={},
        rank_pattern={},
    )
    lora.inject_adapter(lora.model, adapter_name)
    _freeze_adapter(lora.model, adapter_name)
    for key in [key for key, _ in lora.model.named_modules() if lora.prefix not in key]:
        _, target, _ = _get_submodules(lora.model, key)
        if not isinstance(target, LoraLayer):
            continue
        if adapter_name in target.lora_A:
            new_a, new_b = target.lora_A[adapter_name].weight, target.lora_B[adapter_name].weight
        elif adapter_name in target.lora_embedding_A:
            new_a, new_b = (
                target.lora_embedding_A[adapter_name],
                target.lora_embedding_B[adapter_name],
            )
        else:
            continue
        if not isinstance(target, (Linear, Embedding)):  # convolutions: PEFT's dense SVD
            new_a.data, new_b.data = lora._svd_generalized_task_arithmetic_weighted_adapter(
                combination_type,
                adapters,
                weights,
                new_rank,
                target,
                new_a * 0.0,
                new_b * 0.0,
                density,
                majority_sign_method,
                svd_clamp,
                full_matrices=svd_full_matrices,
                driver=svd_driver,
            )
            continue
        factors = _factors(target, adapters, weights)
        if factors is None:
            raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        u, s, vh = factored_truncated_svd(*factors, new_rank)
        u = u * s  # U diag(S), as PEFT
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
            u, vh = u.clamp(-high, high), vh.clamp(-high, high)
        new_a.data = vh.to(new_a.dtype)
        new_b.data = u.to(new_b.dtype)
