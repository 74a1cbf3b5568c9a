"""mergekit (method "mergekit"): the per-tensor methods of mergekit 0.1.5 with mergekit's own
semantics, so that a mergekit YAML (integrations/mergekit_config.py) merges here to the same
tensors as `mergekit-yaml`, streamed within r2m_ext's memory budget.

Where mergekit and r2m_ext's spec (§6) differ, this module follows mergekit:
- parameters are per model and per tensor: `weight`, `density`, `gamma` may differ by model,
  by tensor-name filter (`{filter: "mlp", value: 0.5}`, substring match, first match wins) and
  by layer (a list of numbers is a gradient interpolated over the layer index t in [0, 1]);
- TIES trims each task vector per tensor to the `int(density * numel)` largest magnitudes
  (not the spec's global ceil threshold), multiplies by the weights *before* electing signs,
  and with `normalize` divides by the sum of the weights that agree (not their count);
- DARE keeps each entry with probability `density` and, with `rescale`, rescales the kept
  entries to the task vector's L1 norm (mergekit's RescaleNorm.l1), not by 1 / density;
- breadcrumbs drops the `gamma` fraction of largest magnitudes as well as the smallest.
DARE's mask is r2m_ext's (a function of seed, tensor name and task: determinism.py), not
torch.bernoulli's stream, so its kept entries differ from mergekit's run by construction; the
kept fraction and everything after the mask follow mergekit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r2m_ext import ops
from r2m_ext.determinism import DareMask, dare_stream
from r2m_ext.errors import R2MError
from r2m_ext.methods.common import TaskTensors
from r2m_ext.methods.passes import Merged, MethodPasses
from r2m_ext.methods.registry import MergeMethod, Range, option, register
from r2m_ext.methods.select import KthLargestMagnitude, counts_nonfinite
from r2m_ext.plan import TensorPlan
from r2m_ext.reference import dare_kept


@dataclass(frozen=True)
class GeneralizedTaskArithmetic:
    """One of mergekit's generalized task arithmetic methods (mergekit/merge_methods/registry.py):
    how task vectors are sparsified, whether signs are elected, and the parameter defaults."""

    sparsification: str | None  # "magnitude", "random", "magnitude_outliers" or None
    consensus: bool  # TIES's sign election ("sum" in mergekit)
    default_normalize: bool
    default_rescale: bool


GTA_METHODS = {
    "task_arithmetic": GeneralizedTaskArithmetic(None, False, False, False),
    "ties": GeneralizedTaskArithmetic("magnitude", True, True, False),
    "dare_linear": GeneralizedTaskArithmetic("random", False, False, True),
    "dare_ties": GeneralizedTaskArithmetic("random", True, False, True),
    "breadcrumbs": GeneralizedTaskArithmetic("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": GeneralizedTaskArithmetic("magnitude_outliers", True, False, False),
}
# linear is a weighted mean of every input, the base among them (it has no task vectors).
MERGEKIT_METHODS = ("linear", *GTA_METHODS)
# Workspace of a sparsified tensor beyond its inputs, in tensors of its size: one task's
# magnitudes, its selected indices (int64) and bool mask; later the elected signs, the divisor
# and the update (the task vectors are masked in place).
_SPARSIFIED_WORKSPACE = 3
# The fused TIES's, in tensors of its size: the result.
_FUSED_TIES_WORKSPACE = 1


@dataclass(frozen=True)
class Parameter:
    """A mergekit parameter: its value type, whether it is per model, its default (None:
    required)."""

    kind: type  # float or bool
    per_model: bool
    default: Any = None


def method_parameters(method: str) -> dict[str, Parameter]:
    """The parameters mergekit's `method` takes (the spec of its MergeMethod)."""
    if method == "linear":
        return {"weight": Parameter(float, True), "normalize": Parameter(bool, False, True)}
    gta = GTA_METHODS[method]
    parameters = {
        "int8_mask": Parameter(bool, False, False),
        "normalize": Parameter(bool, False, gta.default_normalize),
        "rescale": Parameter(bool, False, gta.default_rescale),
        "lambda": Parameter(float, False, 1.0),
        "weight": Parameter(float, True),
        "density": Parameter(float, True, 1.0),
    }
    if gta.sparsification == "magnitude_outliers":
        parameters["gamma"] = Parameter(float, True, 0.01)
    return parameters


def scalar_value(value: Any, kind: type, where: str) -> Any:
    """A scalar setting as mergekit's pydantic validation reads it (YAML writes 1e-3 as a
    string; booleans accept true/false, yes/no, 0/1)."""
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise R2MError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("true", "yes", "on", "1", "t", "y"):
        return True
    if text in ("false", "no", "off", "0", "f", "n"):
        return False
    raise R2MError(f"{where}: expected true or false, got {value!r}")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def check_setting(setting: Any, kind: type, where: str) -> None:
    """Raises, naming `where`, unless `setting` is a mergekit ParameterSetting whose scalars are
    of `kind`: a scalar, a gradient (list of scalars), {value, filter} or a list of those."""
    if _is_scalar(setting):
        scalar_value(setting, kind, where)
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise R2MError(f"{where}: expected a value, a list of values or {{filter, value}} items")
    if all(_is_scalar(item) for item in setting):
        for item in setting:
            scalar_value(item, kind, where)
        return
    for item in setting:
        if not isinstance(item, Mapping) or "value" not in item:
            raise R2MError(f"{where}: each item of a filtered list needs a 'value'")
        unknown = sorted(set(item) - {"value", "filter"})
        if unknown:
            raise R2MError(f"{where}: unknown key(s) {', '.join(unknown)} in a filtered item")
        if item.get("filter") is not None and not isinstance(item["filter"], str):
            raise R2MError(f"{where}: a filter is a tensor-name substring")
        value = item["value"]
        if not (_is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value)))):
            raise R2MError(f"{where}: a filtered value is a value or a gradient")
        check_setting(value, kind, where)


def check_parameter_settings(settings: Any, method: str, where: str) -> None:
    """Raises, naming `where`, unless `settings` maps parameters of mergekit's `method` to
    settings of their types."""
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise R2MError(f"{where}: must be a mapping of parameter names to values")
    known = method_parameters(method)
    for name, setting in settings.items():
        if name not in known:
            raise R2MError(
                f"{where}.{name}: mergekit's {method} takes no parameter {name!r} "
                f"(it takes {', '.join(known)})"
            )
        check_setting(setting, known[name].kind, f"{where}.{name}")


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: type, where: str) -> Any:
    """The value of a checked setting for one tensor at layer position `t` (mergekit's
    evaluate_setting): the first filter contained in the name (or none, or "*") wins; a
    gradient of numbers interpolates linearly, of booleans picks an endpoint. None where no
    filter matches."""
    if _is_scalar(setting):
        return scalar_value(setting, kind, where)
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(item) for item in setting):
        values = [scalar_value(item, kind, where) for item in setting]
        if kind is not float:
            return values[int(t * (len(values) - 1))]
        position = t * (len(values) - 1)
        low = int(position)
        high = min(len(values) - 1, low + 1)
        fraction = position - low
        return (1 - fraction) * values[low] + fraction * values[high]
    for item in setting:
        pattern = item.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(item["value"], tensor_name, t, kind, where)
    return None


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder/encoder layer a tensor belongs to ("model.layers.3.mlp..." -> 3), or None
    for the tensors before and after the layers (embeddings, final norm, head)."""
    match = _LAYER_INDEX.search(name)
    return None if match is None else int(match.group(1))


def layer_position(name: str, n_layers: int) -> float:
    """mergekit's t: index / (layers - 1) inside the layers (1 with one layer), 0 outside."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0


@dataclass(frozen=True)
class MergekitOptions:
    mergekit_method: str = option(
        "task_arithmetic",
        "which of mergekit's methods, with its semantics",
        choices=MERGEKIT_METHODS,
    )
    mergekit_parameters: str = option(
        "{}",
        "mergekit's parameter settings as JSON: {'shared': {...}, 'inputs': [{...} for the base, "
        "then each expert]} (what `r2m merge --config MERGEKIT.yaml` fills in)",
    )
    seed: int = option(0, "seed of the drop mask", check=Range(0, 2**64, high_open=True))


@dataclass(frozen=True)
class ParameterSettings:
    """A merge's settings parsed from `mergekit_parameters`: shared and per input (the engine's
    base first, then its experts), each a mapping of parameter name to setting."""

    shared: Mapping[str, Any]
    inputs: tuple[Mapping[str, Any], ...]

    @classmethod
    def parse(cls, text: str, method: str, n_inputs: int) -> ParameterSettings:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise R2MError(f"mergekit_parameters: not JSON ({error})") from None
        if not isinstance(document, dict) or set(document) - {"shared", "inputs"}:
            raise R2MError("mergekit_parameters: a mapping with 'shared' and 'inputs'")
        shared = document.get("shared") or {}
        inputs = document.get("inputs") or [{}] * n_inputs
        if not isinstance(inputs, list) or len(inputs) != n_inputs:
            raise R2MError(
                f"mergekit_parameters: 'inputs' needs one mapping per input ({n_inputs}: the base, "
                "then each expert)"
            )
        for label, settings in [("shared", shared)] + [
            (f"input {i}", s) for i, s in enumerate(inputs)
        ]:
            check_parameter_settings(settings, method, f"mergekit_parameters: {label}")
        return cls(shared, tuple(inputs))

    def resolve(
        self, name: str, parameter: Parameter, tensor: str, t: float, model: int | None
    ) -> Any:
        """A parameter's value for one tensor: the model's own setting, else the shared one,
        else the default; a required one missing is an error naming the tensor."""
        scopes = ([self.inputs[model]] if model is not None else []) + [self.shared]
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor, t, parameter.kind, name)
                if value is not None:
                    return value
        if parameter.default is None:
            who = "the base" if model == 0 else f"expert {model}"
            raise R2MError(f"mergekit: no value of {name!r} for {who} on tensor {tensor!r}")
        return parameter.default


def _l1_norm_before(tau: torch.Tensor, rescale: bool) -> torch.Tensor | None:
    return tau.abs().sum() if rescale else None


def _rescale_(tau: torch.Tensor, before: torch.Tensor | None) -> None:
    """mergekit's rescaled_masked_tensor with RescaleNorm.l1, on the masked `tau` in place:
    back to the L1 norm it had `before` the mask (None: no rescale)."""
    if before is None:
        return
    after = tau.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return
    tau.mul_(before / after)


def _select_by_histograms(
    base: torch.Tensor, experts: list[torch.Tensor], ks: list[int], on_counts=None
) -> KthLargestMagnitude:
    """Each task's exact ks[i]-th largest |experts[i] - base| (float32) by the native radix
    select of TIES's global threshold: two histogram passes of ops.magnitude_histogram, no
    sort. `on_counts(counts, shift, width)` sees each pass's counts."""
    selector = KthLargestMagnitude(ks, torch.float32, collect_limit=-1)
    while not selector.done:
        prefixes, shift, width = selector.histogram_digit()
        counts = ops.magnitude_histogram(base, experts, prefixes, shift, width)
        if on_counts is not None:
            on_counts(counts, shift, width)
        selector.finish_pass(selector.counts_partial(counts.cpu()))
    return selector


def _kth_largest_magnitude(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The exact k-th largest |flat| (float32, finite), and how many entries equal to it are
    among the k largest."""
    # The kernel histograms |experts - base|: here |flat - 0|.
    selector = _select_by_histograms(torch.zeros_like(flat), [flat], [k])
    return selector.values()[0], selector.needed_at_value()[0]


def _top_entries(tau: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [numel]: the `count` entries of largest magnitude. Among equal magnitudes at the
    cut, the first in index order (mergekit's argsort takes an unspecified one of them), so the
    top j entries are within the top j + 1."""
    flat = tau.reshape(-1)
    if count <= 0:
        return torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count >= flat.numel():
        return torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if flat.dtype == torch.float32 and ops.ties_kernels_native(flat.device):
        threshold, needed = _kth_largest_magnitude(flat, count)
        magnitudes = flat.abs()
        threshold = threshold.to(flat.device)
        kept = magnitudes > threshold
        at_threshold = magnitudes == threshold
        if needed == int(torch.count_nonzero(at_threshold)):
            return kept.logical_or_(at_threshold)
        kept[torch.nonzero(at_threshold).view(-1)[:needed]] = True
        return kept
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:count]
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kept[order] = True
    return kept


def _magnitude_(tau: torch.Tensor, density: float, rescale: bool) -> None:
    """TIES's trim in place: the int(density * numel) largest magnitudes kept (at least one)."""
    if density >= 1:
        return
    if density <= 0 or tau.numel() == 0:
        tau.zero_()
        return
    before = _l1_norm_before(tau, rescale)
    kept = _top_entries(tau, max(1, int(density * tau.numel())))
    tau.mul_(kept.view_as(tau))
    _rescale_(tau, before)


def _magnitude_outliers_(tau: torch.Tensor, density: float, gamma: float, rescale: bool):
    """Breadcrumbs in place: of the magnitudes in ascending order, ranks [bottom, bottom +
    keep) kept, keep = int(density * numel), bottom = max(0, numel - keep - int(gamma *
    numel)): the smallest and the int(gamma * numel) largest dropped (fewer largest where
    density + gamma > 1)."""
    if density >= 1:
        return
    count = tau.numel()
    keep = int(density * count)
    upper = count - max(0, count - keep - int(gamma * count))  # ranks below it, from the top
    before = _l1_norm_before(tau, rescale)
    kept = _top_entries(tau, upper)
    kept &= ~_top_entries(tau, upper - keep)
    tau.mul_(kept.view_as(tau))
    _rescale_(tau, before)


# Entries of DARE's mask drawn at a time (int64 indices and float64 uniforms: 16 bytes each).
_DRAW_CHUNK = 1 << 20


def _random_(tau: torch.Tensor, density: float, rescale: bool, stream: int) -> None:
    """DARE in place: each entry kept with probability density (r2m_ext's deterministic mask:
    entry j of the tensor kept where the uniform of (stream, j) >= 1 - density)."""
    if density >= 1:
        return
    if density <= 0:
        tau.zero_()
        return
    before = _l1_norm_before(tau, rescale)
    flat = tau.view(-1)
    for start in range(0, flat.numel(), _DRAW_CHUNK):
        part = flat[start : start + _DRAW_CHUNK]
        mask = DareMask((stream,), start, 1.0 - density)
        part.mul_(dare_kept(mask, part.shape)[0].to(part.device))
    _rescale_(tau, before)


def merge_mergekit(tensors: TaskTensors, options: MergekitOptions, report: dict) -> MethodPasses:
    method = options.mergekit_method
    n = tensors.n_experts
    settings = ParameterSettings.parse(options.mergekit_parameters, method, n + 1)
    parameters = method_parameters(method)
    indices = [layer_index(entry.name) for entry in tensors.body]
    n_layers = max((i for i in indices if i is not None), default=-1) + 1
    report["mergekit_method"] = method

    def resolved(entry: TensorPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared values, per-input values) for one tensor, inputs as in settings.inputs."""
        t = layer_position(entry.name, n_layers)
        shared = {
            name: settings.resolve(name, p, entry.name, t, None)
            for name, p in parameters.items()
            if not p.per_model
        }
        weighted = range(n + 1) if method == "linear" else range(1, n + 1)
        per_input = [
            {
                name: settings.resolve(name, p, entry.name, t, model)
                for name, p in parameters.items()
                if p.per_model
            }
            for model in weighted
        ]
        return shared, per_input

    gta = GTA_METHODS.get(method)

    def emit_combination(entry: TensorPlan) -> Merged:
        """linear and task_arithmetic: base_weight * base + sum_i c_i * tau_i, in one fused
        pass over row blocks (ops.combine)."""
        shared, per_input = resolved(entry)
        weights = [values["weight"] for values in per_input]
        total = sum(weights)
        if method == "linear":
            # sum_j w_j theta_j = total * theta_0 + sum_i w_i tau_i (the base is input 0).
            divisor = total if shared["normalize"] else 1.0
            if divisor == 0:
                raise R2MError(f"mergekit linear: the weights of {entry.name!r} sum to 0")
            base_weight = total / divisor
            coefficients = [w / divisor for w in weights[1:]]
        else:
            divisor = total if abs(total) >= 1e-8 else 1.0
            scale = (1.0 / divisor if shared["normalize"] else 1.0) * shared["lambda"]
            base_weight = 1.0
            coefficients = [w * scale for w in weights]
        matrix = torch.tensor([coefficients], dtype=torch.float64)
        zero_weight = [i + 1 for i, c in enumerate(coefficients) if c == 0]
        for rows, base, experts in tensors.raw_blocks(entry):
            merged = ops.combine(
                base, experts, matrix, base_weight, tensors.compute_dtype, entry.out_dtype
            )
            tensors.check_finite(entry, rows, merged, zero_weight)
            yield entry.name, rows, merged[0]
            del base, experts, merged  # one block at a time (MergeInputs.raw_blocks)

    def sparsify_(entry: TensorPlan, task: int, values, shared, tau: torch.Tensor) -> None:
        """Task `task`'s task vector (its row of the stack) sparsified in place."""
        density, rescale = values["density"], shared["rescale"]
        if gta.sparsification == "magnitude":
            _magnitude_(tau, density, rescale)
        elif gta.sparsification == "magnitude_outliers":
            _magnitude_outliers_(tau, density, values["gamma"], rescale)
        else:
            stream = dare_stream(options.seed, entry.name, entry.shape, task)
            _random_(tau, density, rescale, stream)

    def emit_fused_ties(entry: TensorPlan, shared, per_input) -> Merged:
        """mergekit's TIES of one tensor without a task vector formed: each task's exact k-th
        largest magnitude by two histogram passes over the raw inputs (the first also checks
        them for NaN/Inf), then trim, weight, sign election, agreeing sum and its normalisation
        in one fused pass (ops.ties_merge_weighted), with the torch path's bits where torch
        sums in order."""
        base, experts = tensors.load_raw(entry.name, _FUSED_TIES_WORKSPACE / n, "run TIES")
        numel = entry.numel
        densities = [values["density"] for values in per_input]

        def check_finite(counts, shift, width):
            if shift + width == 31:  # the first pass sees every entry
                nonfinite = counts_nonfinite(counts, shift, width)
                proof = torch.full((), math.inf if nonfinite else 0)
                tensors.check_finite(entry, None, proof, (), held=[base, *experts])

        ks = [min(numel, max(1, int(d * numel))) for d in densities]
        selector = _select_by_histograms(base, experts, ks, check_finite)
        thresholds = selector.values()
        needed, at_value = selector.needed_at_value(), selector.at_value()
        # Where the cut splits the entries tied at the threshold, the first `needed` of them in
        # index order are kept: up to the index of the last of those.
        splits = [0 < d < 1 and needed[i] < at_value[i] for i, d in enumerate(densities)]
        last_kept = ops.nth_at_magnitude(
            base,
            experts,
            thresholds,
            [n if split else 0 for n, split in zip(needed, splits, strict=True)],
        )
        cutoffs = []
        for i, density in enumerate(densities):
            if density >= 1:  # no trim
                thresholds[i] = 0.0
                cutoffs.append(numel)
            elif density <= 0:  # nothing kept
                thresholds[i] = math.inf
                cutoffs.append(-1)
            else:  # every entry at the threshold kept, or those up to the last one kept
                cutoffs.append(last_kept[i] if splits[i] else numel)
        merged = ops.ties_merge_weighted(
            base,
            experts,
            thresholds,
            cutoffs,
            [values["weight"] for values in per_input],
            shared["normalize"],
            shared["lambda"],
        )
        yield entry.name, None, merged

    def emit_sparsified(entry: TensorPlan) -> Merged:
        """The methods that sparsify (by a rank order or a norm of the whole tensor) and/or
        elect signs: whole tensors, the task vectors changed in place one task at a time, as
        mergekit computes them: weighted, masked by the elected sign, summed over the tasks.
        TIES without rescale, in float32 with native kernels: one fused pass instead."""
        shared, per_input = resolved(entry)
        if fused_ties and not shared["rescale"]:
            yield from emit_fused_ties(entry, shared, per_input)
            return
        base, tau = tensors.load(entry.name, _SPARSIFIED_WORKSPACE / n, task_vectors=True)
        weights = [values["weight"] for values in per_input]
        for task, values in enumerate(per_input):
            if gta.sparsification is not None:
                sparsify_(entry, task, values, shared, tau[task])
            tau[task].mul_(weights[task])
        if gta.consensus:
            positive = tau.sum(0) >= 0  # the elected sign: + where the weighted sum is >= 0
            divisor = torch.zeros_like(base)
            for task, weight in enumerate(weights):
                # The sign bit differs from the elected "negative"; zeros agree with neither.
                agrees = (torch.signbit(tau[task]) ^ positive).logical_and_(tau[task] != 0)
                tau[task].mul_(agrees)
                divisor.add_(agrees, alpha=weight)
            del positive, agrees
            divisor[divisor == 0] = 1
        else:
            total = sum(weights)
            divisor = total if abs(total) >= 1e-8 else 1.0
        update = tau.sum(0)
        del tau
        if shared["normalize"]:
            update.div_(divisor)
        if shared["lambda"] != 1:
            update.mul_(shared["lambda"])
        yield entry.name, None, update.add_(base)

    elementwise = gta is None or (gta.sparsification is None and not gta.consensus)
    fused_ties = (
        gta is not None
        and gta.sparsification == "magnitude"
        and gta.consensus
        and tensors.compute_dtype == torch.float32
        and ops.ties_kernels_native(tensors.device)
    )
    return MethodPasses(
        write_label=f"mergekit {method}",
        emit=emit_combination if elementwise else emit_sparsified,
    )


def _check_experts(options: MergekitOptions, n_experts: int) -> None:
    ParameterSettings.parse(options.mergekit_parameters, options.mergekit_method, n_experts + 1)


register(
    MergeMethod(
        name="mergekit",
        summary="mergekit's per-tensor methods with mergekit's semantics (see --config)",
        options=MergekitOptions,
        merge=merge_mergekit,
        passes=("merge",),
        check_experts=_check_experts,
        runs_with_defaults=False,
    )
)


def settings_json(shared: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]]) -> str:
    """`mergekit_parameters` as written into a recipe: canonical JSON (sorted keys)."""
    return json.dumps({"shared": dict(shared), "inputs": [dict(i) for i in inputs]}, sort_keys=True)
