"""A PEFT LoRA adapter directory as an expert: `adapter_config.json` (peft_type LORA) and
`adapter_model.safetensors` (or `adapter_model.bin`, loaded with weights_only=True), applied to
the merge's base. Read as a TensorSource whose tensors are the dense expert PEFT's
`merge_and_unload()` would give: W + s * B @ A for every adapted module (transposed where
`fan_in_fan_out`; lora_embedding_A/B for embeddings), the saved tensor for `modules_to_save`
and trained biases, the base's tensor elsewhere. One tensor at a time, so any method merges
adapters within the memory budget.

What PEFT writes is read as PEFT reads it: s = lora_alpha / r (lora_alpha / sqrt(r) with
`use_rslora`), r and alpha per module through `rank_pattern` and `alpha_pattern` (a key matches
a module name that ends with it after a dot), module names with PEFT's `base_model.model.`
prefix, matched to the base's tensor names (also when the adapter's model wraps the base's under
more prefixes, or the other way round). What cannot be honoured is refused naming the adapter
file, the key and the feature: DoRA, other PEFT types (LoHa, LoKr, IA3, ...), convolution
LoRA, a module with no base tensor, a shape that does not match.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from r2m_ext.errors import R2MError
from r2m_ext.io.paths import require_regular_file
from r2m_ext.io.safetensors_format import SafetensorsFile
from r2m_ext.io.source import SourceFormat, TensorMeta, TensorSource, register_source_format

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # as PEFT saves them
PEFT_PREFIX = "base_model.model."
# Key suffixes of a LoRA module's factors: (A, B, whether an embedding's).
_FACTOR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight", False),
    (".lora_embedding_A", ".lora_embedding_B", True),
)


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors' keys, rank, scaling and how the delta is laid out."""

    module: str  # the module's name in the adapter (PEFT prefix removed)
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scaling: float
    embedding: bool  # delta = (B @ A)^T, [num_embeddings, dim]
    fan_in_fan_out: bool  # delta = (B @ A)^T (GPT-2's Conv1D)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key that `module` ends with after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """The adapter's config and factors, read from its directory (no base needed)."""

    def __init__(self, path: Path):
        self.path = path
        config_path = path / ADAPTER_CONFIG
        require_regular_file(config_path, "adapter config")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise R2MError(f"{config_path}: not a readable adapter config ({error})") from None
        if not isinstance(config, dict):
            raise R2MError(f"{config_path}: not an adapter config (a JSON mapping)")
        self.config_path = config_path
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise R2MError(
                f"{config_path}: peft_type {peft_type!r}: only LoRA adapters can be merged "
                "(LoHa, LoKr, IA3 and the other PEFT types are not supported)"
            )
        if config.get("use_dora"):
            raise R2MError(
                f"{config_path}: use_dora: DoRA adapters (magnitude vectors) are not supported"
            )
        self.config = config
        self.weights_path = self._weights_file()
        self.tensors = self._load_weights()
        self.modules = self._modules()

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of saved tensor `key`, without reading it."""
        tensors = self.tensors
        return (
            tensors.shape(key) if isinstance(tensors, _SavedTensors) else tuple(tensors[key].shape)
        )

    def close(self) -> None:
        if isinstance(self.tensors, _SavedTensors):
            self.tensors.close()

    def _weights_file(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).exists():
                require_regular_file(self.path / name, "adapter weights")
                return self.path / name
        raise R2MError(f"{self.path}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")

    def _load_weights(self) -> Mapping[str, torch.Tensor]:
        path = self.weights_path
        if path.suffix == ".safetensors":
            return _SavedTensors(SafetensorsFile(path))
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise R2MError(f"{path}: not a loadable adapter ({error})") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise R2MError(f"{path}: not a state dict of tensors")
        return loaded

    def _modules(self) -> list[LoraModule]:
        config = self.config
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        modules = []
        for key in self.tensors:
            if "lora_magnitude_vector" in key:
                raise R2MError(
                    f"{self.weights_path}: {key}: DoRA magnitude vectors are not supported"
                )
            for suffix_a, suffix_b, embedding in _FACTOR_SUFFIXES:
                if not key.endswith(suffix_a):
                    continue
                prefixed = key[: -len(suffix_a)]
                key_b = prefixed + suffix_b
                if key_b not in self.tensors:
                    raise R2MError(f"{self.weights_path}: {key} has no {key_b}")
                a, b = self.shape(key), self.shape(key_b)
                if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                    raise R2MError(
                        f"{self.weights_path}: {key} {list(a)} and {key_b} "
                        f"{list(b)}: not the factors of a linear or embedding LoRA "
                        "(convolution LoRA is not supported)"
                    )
                module = prefixed.removeprefix(PEFT_PREFIX)
                rank = int(a[0])
                declared = _pattern_value(rank_pattern, module, config.get("r", rank))
                if declared != rank:
                    raise R2MError(
                        f"{self.weights_path}: {key} has rank {rank}, the config says {declared}"
                    )
                alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
                root = math.sqrt(rank) if config.get("use_rslora") else rank
                modules.append(
                    LoraModule(
                        module,
                        key,
                        key_b,
                        rank,
                        alpha,
                        alpha / root,
                        embedding,
                        bool(config.get("fan_in_fan_out")) and not embedding,
                    )
                )
        if not modules:
            raise R2MError(f"{self.weights_path}: no LoRA factors (lora_A/lora_B) in the adapter")
        return modules

    def full_tensors(self) -> dict[str, str]:
        """Tensors saved whole (modules_to_save, trained biases, embedding layers saved with the
        adapter), by their name without PEFT's prefix: the adapter key of each."""
        factors = {k for m in self.modules for k in (m.key_a, m.key_b)}
        return {
            key.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): key
            for key in self.tensors
            if key not in factors
        }

    def delta(self, module: LoraModule, rows: slice | None = None) -> torch.Tensor:
        """s * B @ A laid out as the module's weight (transposed for embeddings and
        fan_in_fan_out), in float32: only `rows` of it, so that a tensor read in row blocks
        costs one product in all."""
        a = self.tensors[module.key_a].float()
        b = self.tensors[module.key_b].float()
        # A whole tensor is B @ A as PEFT computes it (the same bits as merge_and_unload). A row
        # block is the product of just its rows of B (columns of A where transposed): bounded
        # memory and work, equal to the whole's rows to float rounding (BLAS may sum a subset
        # in another order), as the engine allows between budgets.
        if module.embedding or module.fan_in_fan_out:
            return ((b @ (a if rows is None else a[:, rows])) * module.scaling).T
        return ((b if rows is None else b[rows]) @ a) * module.scaling


class _SavedTensors(Mapping[str, torch.Tensor]):
    """An adapter's safetensors by key, each read (mapped from the file, not copied) when asked
    for: eight rank-16 adapters of a 7B model hold 1.3 GB of float32 factors, which a merge
    needs one module at a time."""

    def __init__(self, handle: SafetensorsFile):
        self._handle = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._handle.entries:
            raise KeyError(key)
        return self._handle.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._handle.entries)

    def __len__(self) -> int:
        return len(self._handle.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.entries[key][1])

    def close(self) -> None:
        self._handle.close()


def _match(name: str, base_names: set[str]) -> str | None:
    """The base tensor an adapter tensor name refers to: the same name, or the same after
    leading components are dropped from either (a task model's `model.` around a backbone)."""
    if name in base_names:
        return name
    parts = name.split(".")
    # At most two leading components (`model.`, `base_model.`, `vit.`): dropping more could
    # name another module's tensor.
    for start in range(1, min(3, len(parts) - 1)):
        shorter = ".".join(parts[start:])
        if shorter in base_names:
            return shorter
    wider = [b for b in base_names if b.endswith("." + name)]
    return wider[0] if len(wider) == 1 else None


class LoraSource:
    """A LoRA adapter applied to `base`, as a TensorSource of the dense expert."""

    def __init__(self, path: Path, base: TensorSource | None):
        self.adapter = LoraAdapter(path)
        if base is None:
            raise R2MError(
                f"{path}: a LoRA adapter, not a dense model: it is merged as an expert onto the "
                "base, and cannot be the base"
            )
        self._base = base
        self.label = str(path)
        self.directory = path
        self.files = [self.adapter.weights_path]
        self.files_read = [self.adapter.config_path, self.adapter.weights_path, *base.files_read]
        base_meta = base.metadata()
        names = set(base_meta)
        self._deltas: dict[str, LoraModule] = {}
        self._whole: dict[str, str] = {}
        weights = self.adapter.weights_path
        for module in self.adapter.modules:
            target = _match(module.module + ".weight", names)
            if target is None:
                raise R2MError(
                    f"{weights}: {module.key_a}: module {module.module!r} has no weight in the "
                    f"base {base.label}"
                )
            shape = tuple(base_meta[target][0])
            columns_a, rows_b = (
                self.adapter.shape(module.key_a)[1],
                self.adapter.shape(module.key_b)[0],
            )
            transposed = module.embedding or module.fan_in_fan_out
            rows, columns = (columns_a, rows_b) if transposed else (rows_b, columns_a)
            if shape != (rows, columns):
                raise R2MError(
                    f"{weights}: {module.key_a}: the update is [{rows}, {columns}], the base's "
                    f"{target} is {list(shape)}"
                )
            self._deltas[target] = module
        for name, key in self.adapter.full_tensors().items():
            target = _match(name, names)
            if target is None:
                raise R2MError(f"{weights}: {key}: no tensor {name!r} in the base {base.label}")
            saved = self.adapter.shape(key)
            if saved != tuple(base_meta[target][0]):
                raise R2MError(
                    f"{weights}: {key} is {list(saved)}, the base's {target} is "
                    f"{list(base_meta[target][0])}"
                )
            self._whole[target] = key
        self._meta = base_meta

    def metadata(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def adapted_modules(self) -> dict[str, LoraModule]:
        """The LoRA modules, by the base tensor each updates."""
        return dict(self._deltas)

    def whole_tensors(self) -> dict[str, str]:
        """Tensors saved whole in the adapter, by base tensor name: the adapter key of each."""
        return dict(self._whole)

    def has_low_rank_update(self, name: str) -> bool:
        """Whether `low_rank_update(name)` gives factors (the adapter did not save it whole)."""
        return name not in self._whole

    def low_rank_update(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left [m, r], right [n, r]) in float32 with this expert's update of matrix `name`
        equal to left @ right^T (rank 0 where the adapter leaves it as the base's), or None
        where the adapter saved it whole (its update is not low-rank)."""
        if name in self._whole:
            return None
        module = self._deltas.get(name)
        if module is None:
            rows, columns = self._meta[name][0]
            return torch.zeros(rows, 0), torch.zeros(columns, 0)
        a = self.adapter.tensors[module.key_a].float()
        b = self.adapter.tensors[module.key_b].float() * module.scaling
        if module.embedding or module.fan_in_fan_out:  # the update is (B @ A)^T = A^T B^T
            return a.T, b
        return b, a.T

    def read(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
        if name in self._whole:  # saved whole: replaces the base's (an embedding: then + delta)
            tensor = self.adapter.tensors[self._whole[name]].to(self._meta[name][1])
            tensor = tensor if rows is None else tensor[rows]
        else:
            tensor = self._base.read(name, rows)
        module = self._deltas.get(name)
        if module is not None:
            tensor = (tensor.float() + self.adapter.delta(module, rows)).to(tensor.dtype)
        return tensor.pin_memory() if pinned else tensor

    def where(self, name: str) -> str:
        if name in self._whole or name in self._deltas:
            return str(self.adapter.weights_path)
        return self._base.where(name)

    def close(self) -> None:
        self.adapter.close()

    def describe(self) -> list[str]:
        return describe_adapter(self.adapter)


def describe_adapter(adapter: LoraAdapter) -> list[str]:
    """`r2m inspect ADAPTER`: the modules, ranks and scalings."""
    config = adapter.config
    lines = [
        f"{adapter.path}: LoRA adapter, {len(adapter.modules)} modules, r {config.get('r')}, "
        f"lora_alpha {config.get('lora_alpha')}"
        + (", rsLoRA (alpha / sqrt(r))" if config.get("use_rslora") else "")
        + (", fan_in_fan_out" if config.get("fan_in_fan_out") else ""),
    ]
    width = max(len(m.module) for m in adapter.modules)
    lines.append(f"{'module'.ljust(width)}  rank  alpha  scaling  kind")
    for m in adapter.modules:
        kind = "embedding" if m.embedding else "linear"
        lines.append(
            f"{m.module.ljust(width)}  {m.rank:4d}  {m.alpha:5g}  {m.scaling:7.4g}  {kind}"
        )
    for name in adapter.full_tensors():
        lines.append(f"{name}: saved whole (modules_to_save, bias or embedding layer)")
    return lines


register_source_format(
    SourceFormat("lora", recognizes=is_adapter, open=LoraSource, needs_base=True)
)
