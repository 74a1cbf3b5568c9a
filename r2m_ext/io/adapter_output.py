"""A merge of LoRA experts written as a PEFT LoRA adapter (`--out-format peft`): the directory
`peft.PeftModel.from_pretrained(base_model, OUT)` loads, adapter_model.safetensors and
adapter_config.json, instead of a whole model.

Each module the experts adapt gets factors of its merged update M = merged - base (laid out as
PEFT lays out B @ A: transposed for embeddings and fan_in_fan_out):

- For methods whose update stays in the span of the experts' factors (average, task
  arithmetic, R²M, TSV-M, CART: `MergeMethod.update_in_expert_span`), the SVD of a small core
  (at most sum r_j square) gives the adapter: exact at rank min(sum r_j, m, n), or the best
  rank-`max_rank` approximation of M. A matrix merged from the factors comes as
  Q_L core Q_R^T (methods/passes.py: LowRankUpdate; no m x n matrix, no base read); a dense
  merged M (a tensor some expert did not give as factors) is projected, M = Q_B (Q_B^T M Q_A)
  Q_A^T, with Q_B and Q_A orthonormal bases of the experts' stacked B and A factors.
- For the others (TIES, DARE: elementwise, so M leaves the span), and wherever dense experts
  join the LoRA ones (their updates are in no factor span), only with `max_rank`: the best
  rank-`max_rank` approximation of M by a truncated SVD of M itself (LoRA extraction). The
  modules are the LoRA experts' either way.

Every factor pair has scaling 1 (lora_alpha = r per module, through rank_pattern and
alpha_pattern). Tensors the experts saved whole (modules_to_save, trained biases) are written
whole, merged; every other merged tensor must be the base's (to rounding), or the merge cannot
be an adapter and is refused naming the tensor. The report gives each module's rank and the
share of ||M||^2 its factors keep (1 where exact)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.determinism import name_key
from r2m_ext.errors import R2MError
from r2m_ext.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoraModule, LoraSource
from r2m_ext.io.source import TensorSource
from r2m_ext.methods.passes import LowRankUpdate
from r2m_ext.plan import MergePlan

# What an adapter output holds: the files PEFT writes (the safetensors form of its weights).
ADAPTER_WEIGHTS_FILE = ADAPTER_WEIGHTS[0]
ADAPTER_CONFIG_FILE = ADAPTER_CONFIG
# Merged tensors outside the adapter may differ from the base's by this many ulps (an average of
# identical copies rounds), and no more.
_BASE_TOLERANCE_ULPS = 8
_BIAS_SETTINGS = ("none", "lora_only", "all")  # PEFT's, from least to most inclusive


@dataclass
class _Module:
    """One adapted module of the output: where its factors go and what the experts give it."""

    tensor: str  # the base tensor it updates
    prefixed: str  # PEFT key prefix: base_model.model.<module>
    module: str
    embedding: bool
    transposed: bool  # M = (B @ A)^T: embeddings and fan_in_fan_out
    experts: list[tuple[LoraSource, LoraModule]]  # each expert adapting it
    rank: int  # of the factors written

    def factors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(s_j B_j, A_j) of each expert adapting it, in float64, read now (not held: a 7B
        model's adapters are too large to keep in memory beside the merge)."""
        for source, lora in self.experts:
            a = source.adapter.tensors[lora.key_a].double()
            yield source.adapter.tensors[lora.key_b].double() * lora.scaling, a

    @property
    def keys(self) -> tuple[str, str]:
        if self.embedding:
            return f"{self.prefixed}.lora_embedding_A", f"{self.prefixed}.lora_embedding_B"
        return f"{self.prefixed}.lora_A.weight", f"{self.prefixed}.lora_B.weight"


class AdapterOutput:
    """Turns a merge's output tensors into a PEFT adapter's: `layout` (known before the merge,
    for the writer), `convert` per merged tensor, then `config_text` and `report`."""

    def __init__(
        self,
        plan: MergePlan,
        sources: Sequence[TensorSource],
        exact_in_span: bool,
        max_rank: int | None,
        method: str,
    ):
        experts = [source for source in sources[1:] if isinstance(source, LoraSource)]
        dense = [source for source in sources[1:] if not isinstance(source, LoraSource)]
        if not experts:
            raise R2MError(
                "--out-format peft needs LoRA adapters among the experts: the adapter's modules "
                "are theirs (a dense expert's update has no factors to start from); write a "
                "whole model instead"
            )
        if max_rank is not None and max_rank < 1:
            raise R2MError(f"--max-rank must be a positive integer, got {max_rank}")
        if dense and max_rank is None:
            raise R2MError(
                f"{dense[0].label}: a dense expert's update leaves the span of the LoRA experts' "
                "factors, so an adapter of the merge can only approximate it; pass --max-rank R "
                "for the best rank-R one per module"
            )
        if not exact_in_span and max_rank is None:
            raise R2MError(
                f"--out-format peft with {method}: its merged update leaves the span of the "
                "experts' LoRA factors, so an adapter can only approximate it; pass --max-rank R "
                "for the best rank-R one"
            )
        # A dense expert's update is in no factor span: its modules are factored by a sketch.
        self._exact_in_span = exact_in_span and not dense
        self._dense_labels = [source.label for source in dense]
        self._max_rank = max_rank
        self._base = sources[0]
        self._meta = {t.name: t for t in plan.tensors}
        self._modules: dict[str, _Module] = {}
        self._whole: dict[str, str] = {}  # base tensor name -> adapter key
        self._templates = [source.adapter.config for source in experts]
        for source in experts:
            for tensor, module in source.adapted_modules().items():
                self._add_factors(source, tensor, module)
            for tensor, key in source.whole_tensors().items():
                if tensor in source.adapted_modules():
                    # An embedding layer saved beside its LoRA: the update must be B @ A alone.
                    if not torch.equal(source.adapter.tensors[key], self._base.read(tensor)):
                        raise R2MError(
                            f"{source.adapter.weights_path}: {key}: the adapted layer was saved "
                            "changed from the base's, so its update is not its LoRA factors "
                            "alone; write a whole model instead"
                        )
                    continue
                self._whole.setdefault(tensor, key)
        for found in self._modules.values():
            m, n = self._matrix_shape(found)
            in_span = min(sum(lora.rank for _, lora in found.experts), m, n)
            found.rank = in_span if max_rank is None else min(max_rank, m, n)
            if self._exact_in_span and max_rank is not None:
                found.rank = min(found.rank, in_span)
        self._pending: dict[str, list[torch.Tensor]] = {}
        self.module_reports: dict[str, dict] = {}

    def _matrix_shape(self, module: _Module) -> tuple[int, int]:
        shape = self._meta[module.tensor].shape
        return (shape[1], shape[0]) if module.transposed else (shape[0], shape[1])

    def _add_factors(self, source: LoraSource, tensor: str, module: LoraModule) -> None:
        transposed = module.embedding or module.fan_in_fan_out
        found = self._modules.get(tensor)
        if found is None:
            found = _Module(
                tensor,
                PEFT_PREFIX + module.module,
                module.module,
                module.embedding,
                transposed,
                [],
                0,
            )
            self._modules[tensor] = found
        elif (found.embedding, found.transposed) != (module.embedding, transposed):
            raise R2MError(
                f"{source.adapter.weights_path}: {module.key_a}: adapted as "
                f"{'an embedding' if module.embedding else 'a linear layer'}"
                f"{' with fan_in_fan_out' if module.fan_in_fan_out else ''}, another expert "
                "adapts it otherwise; their merge cannot be one adapter"
            )
        found.experts.append((source, module))

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The adapter's tensors in the order `convert` produces them (plan order)."""
        entries = []
        for entry in self._meta.values():
            module = self._modules.get(entry.name)
            if module is not None:
                m, n = self._matrix_shape(module)
                key_a, key_b = module.keys
                entries += [
                    (key_a, (module.rank, n), entry.out_dtype),
                    (key_b, (m, module.rank), entry.out_dtype),
                ]
            elif entry.name in self._whole:
                entries.append((self._whole[entry.name], tuple(entry.shape), entry.out_dtype))
        return entries

    def convert(
        self, name: str, rows: slice | None, values: torch.Tensor | LowRankUpdate
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The adapter's tensors from a merged tensor (or its next row block), or from the
        update of a matrix merged from factors: factors once a module's tensor is complete, a
        whole tensor as it comes, nothing for the others."""
        if isinstance(values, LowRankUpdate):
            module = self._modules.get(name)
            if module is not None:
                a, b = self._factor_update(module, values)
                yield from self._module_tensors(module, a, b)
            elif not values.is_zero():  # no expert adapts it: its update must be zero
                raise self._not_an_adapter(name)
            return
        if name in self._whole:
            yield self._whole[name], values
            return
        module = self._modules.get(name)
        if module is None:
            self._check_unchanged(name, rows, values)
            return
        parts = self._pending.setdefault(name, [])
        parts.append(values)
        if rows is not None and rows.stop < self._meta[name].rows:
            return
        merged = torch.cat(parts) if len(parts) > 1 else parts[0]
        del self._pending[name]
        a, b = self._factor(module, merged)
        yield from self._module_tensors(module, a, b)

    def _module_tensors(
        self, module: _Module, a: torch.Tensor, b: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        out_dtype = self._meta[module.tensor].out_dtype
        key_a, key_b = module.keys
        yield key_a, a.to(out_dtype).contiguous()
        yield key_b, b.to(out_dtype).contiguous()

    def _check_unchanged(self, name: str, rows: slice | None, values: torch.Tensor) -> None:
        base = self._base.read(name, rows)
        if not values.dtype.is_floating_point:
            if torch.equal(values, base.to(values.dtype)):
                return
        else:
            wide = base.double()
            ulp = torch.finfo(values.dtype).eps * wide.abs()
            if bool(((values.double() - wide).abs() <= _BASE_TOLERANCE_ULPS * ulp).all()):
                return
        raise self._not_an_adapter(name)

    def _not_an_adapter(self, name: str) -> R2MError:
        by_dense = (
            f" (the dense expert{'s' if len(self._dense_labels) > 1 else ''} "
            f"{', '.join(self._dense_labels)} change{'' if len(self._dense_labels) > 1 else 's'}"
            " it)"
            if self._dense_labels
            else ""
        )
        return R2MError(
            f"merged tensor {name!r} differs from the base's but no adapter updates it (neither "
            f"a LoRA module nor saved whole){by_dense}: the merge cannot be written as an "
            "adapter; write a whole model instead"
        )

    def _factor(self, module: _Module, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, n], B [m, rank]) with B @ A the module's merged update, or its best
        rank-`rank` approximation; in float64 (the factors are small, the update read once)."""
        base = self._base.read(module.tensor).double()
        update = merged.double() - base
        update = update.T if module.transposed else update
        total = float(update.square().sum())
        if self._exact_in_span:
            factors = list(module.factors())
            q_b, _ = torch.linalg.qr(torch.cat([b for b, _ in factors], dim=1))
            q_a, _ = torch.linalg.qr(torch.cat([a for _, a in factors], dim=0).T)
            del factors
            left, singular, right_h = torch.linalg.svd(q_b.T @ update @ q_a, full_matrices=False)
            left, right_h = q_b @ left, right_h @ q_a.T
        else:
            # A rank-`rank` sketch of the update itself (seeded by the module's tensor, as every
            # r2m_ext SVD): no exact SVD of an m x n matrix.
            key = name_key(module.tensor, tuple(update.shape))
            left, singular, right = ops.randomized_svd(update, module.rank, key=key)
            right_h = right.T
        return self._truncated(module, left, singular, right_h, total)

    def _factor_update(
        self, module: _Module, update: LowRankUpdate
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_factor` of a module whose merged update came factored: the SVD of its small core
        (after QRs of its factors where they are not orthonormal already), exact; no m x n
        matrix, no base."""
        left, right = update.left.double(), update.right.double()
        if update.core is None:
            left, t_left = torch.linalg.qr(left)
            right, t_right = torch.linalg.qr(right)
            core = t_left @ t_right.T
        else:
            core = update.core.double()
        if module.transposed:  # the adapter's B @ A is the update's transpose
            left, right, core = right, left, core.T
        u, singular, vh = torch.linalg.svd(core, full_matrices=False)
        total = float(singular.square().sum())
        return self._truncated(module, left @ u, singular, vh @ right.T, total)

    def _truncated(
        self,
        module: _Module,
        left: torch.Tensor,
        singular: torch.Tensor,
        right_h: torch.Tensor,
        total: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the first `module.rank` singular triplets (zero-padded to it), recording
        the share of the update's energy `total` they keep."""
        rank = module.rank
        left, singular, right_h = left[:, :rank], singular[:rank], right_h[:rank]
        if singular.numel() < rank:  # fewer directions than the layout's rank: zero-padded
            pad = rank - singular.numel()
            left = torch.cat([left, left.new_zeros(left.shape[0], pad)], dim=1)
            right_h = torch.cat([right_h, right_h.new_zeros(pad, right_h.shape[1])])
            singular = torch.cat([singular, singular.new_zeros(pad)])
        kept = float(singular.square().sum())
        self.module_reports[module.module] = {
            "rank": rank,
            "energy_kept": kept / total if total > 0 else 1.0,
        }
        return right_h, left * singular

    def config_text(self) -> str:
        """adapter_config.json: the first expert's config (task type, base model, dropout ...)
        with this adapter's modules, ranks (scaling 1 each), modules_to_save and bias."""
        config = dict(self._templates[0])
        ranks = {m.module: m.rank for m in self._modules.values()}
        top = max(ranks.values(), default=1)
        saved = sorted({s for t in self._templates for s in (t.get("modules_to_save") or [])})
        bias = max((t.get("bias") or "none" for t in self._templates), key=_BIAS_SETTINGS.index)
        config.update(
            r=top,
            lora_alpha=top,
            rank_pattern={module: rank for module, rank in ranks.items() if rank != top},
            alpha_pattern={module: rank for module, rank in ranks.items() if rank != top},
            target_modules=sorted(ranks),
            modules_to_save=saved or None,
            bias=bias,
            use_rslora=False,
            use_dora=False,
            init_lora_weights=True,
            fan_in_fan_out=any(m.transposed and not m.embedding for m in self._modules.values()),
        )
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
