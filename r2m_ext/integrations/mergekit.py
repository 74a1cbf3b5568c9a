"""r2m_ext's per-tensor methods inside mergekit: TSV-M and CART, registered in mergekit 0.1.5's
method registry as `r2m_tsv` and `r2m_cart` and computed with r2m_ext's ops (batched randomized
or exact SVD, fused low-rank accumulation). Their parameters are r2m_ext's options of the same
methods (`alpha`, `rank_ratio`, `lam`, `svd`, `oversample`, `n_iter`, `seed`), shared by all
models, with r2m_ext's defaults; a tensor is factored where r2m_ext would factor it (2-D, both
sides >= 2, not an embedding: `classify.py`), and merged elementwise elsewhere.

    python -m r2m_ext.integrations.mergekit CONFIG.yaml OUT/ [mergekit-yaml options]

registers them and runs mergekit's own `mergekit-yaml`. R²M is not among them: it needs
statistics over all tensors (the Gram of task vectors, the global norm matching), which
mergekit's per-tensor graph cannot give; `r2m merge` runs it, from a mergekit config too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from r2m_ext.classify import TensorClass, classify
from r2m_ext.methods.cart import CartOptions, cart_elementwise, cart_truncated
from r2m_ext.methods.common import kept_rank
from r2m_ext.methods.tsv import TsvOptions, tsv_rank, tsv_update
from r2m_ext.options import DEFAULT_EXCLUDE_TRUNCATION, resolve_options

# mergekit method name -> (r2m_ext method, its options dataclass, display name, paper)
_METHODS = {
    "r2m_tsv": ("tsv", TsvOptions, "TSV-M (r2m_ext)", "https://arxiv.org/abs/2412.00081"),
    "r2m_cart": ("cart", CartOptions, "CART (r2m_ext)", "https://arxiv.org/abs/2412.12153"),
}


def _inputs(group: TensorGroup) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(tensor name, base, task vectors [N, ...]) in float32 (float64 if the inputs are)."""
    dtype = torch.float64 if group.base.tensor.dtype == torch.float64 else torch.float32
    base = group.base.tensor.to(dtype)
    tau = torch.stack([entry.tensor.to(dtype) - base for entry in group.non_base])
    return group.metadata.name or "", base, tau


def _is_matrix(name: str, tau: torch.Tensor) -> bool:
    shape = tuple(tau.shape[1:])
    found = classify(name, shape, tau.dtype, (), DEFAULT_EXCLUDE_TRUNCATION)
    return found is TensorClass.MATRIX


def _tsv(group: TensorGroup, options: TsvOptions) -> torch.Tensor:
    name, base, tau = _inputs(group)
    if not _is_matrix(name, tau):
        return base + tau.mean(0)
    if tsv_rank(tuple(tau.shape[1:]), tau.shape[0]) == 0:
        return base
    return base + options.alpha * tsv_update(tau, options, name)


def _cart(group: TensorGroup, options: CartOptions) -> torch.Tensor:
    name, base, tau = _inputs(group)
    shape = tuple(tau.shape[1:])
    rank = kept_rank(shape, options.rank_ratio) if _is_matrix(name, tau) else 0
    if rank == 0 or rank >= min(shape):
        return cart_elementwise(base, tau, options.lam)
    return cart_truncated(base, tau, rank, options, name)


def _method(mergekit_name: str, merge: Callable) -> FunctionalGroupMergeMethod:
    """A mergekit group method whose shared parameters are the r2m_ext method's options."""
    method, options_class, pretty, paper = _METHODS[mergekit_name]
    fields = dataclasses.fields(options_class)
    spec = MergeMethodSpec(
        name=mergekit_name,
        pretty_name=pretty,
        reference_url=paper,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        parameters=tuple(
            ParameterSpec(
                f.name,
                f.metadata["kind"],
                ParameterScope.SHARED,
                default=f.default,
                description=f.metadata["help"],
            )
            for f in fields
        ),
    )

    def merge_group(group: TensorGroup, /, **parameters) -> torch.Tensor:
        # r2m_ext validates its own options (choices, ranges) with its own messages.
        options = resolve_options(method, **parameters).method_options
        return merge(group, options).to(group.base.tensor.dtype)

    return FunctionalGroupMergeMethod(spec, merge_group)


def register() -> None:
    """Adds r2m_tsv and r2m_cart to mergekit's registry (once)."""
    known = {m.spec.name for m in registry.registered_methods()}
    for name, merge in (("r2m_tsv", _tsv), ("r2m_cart", _cart)):
        if name not in known:
            registry.register(_method(name, merge))


def main() -> None:
    """mergekit-yaml with r2m_ext's methods registered."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    register()
    mergekit_yaml(prog_name="python -m r2m_ext.integrations.mergekit")


if __name__ == "__main__":
    main()
