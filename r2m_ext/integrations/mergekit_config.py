"""mergekit YAML configs as r2m_ext merges: `r2m merge --config MERGEKIT.yaml` reads a config
written for `mergekit-yaml` and runs it through r2m_ext's streaming engine with the method
"mergekit" (methods/mergekit_semantics.py), which follows mergekit's semantics.

What a config can ask that r2m_ext does not do is refused, naming the key: layer stacking
(`slices`, `modules`), tokenizer surgery (`tokenizer_source`, `tokenizer`, `chat_template`),
LoRA references on another model than the base (`other+lora`; `base+lora` is an expert: the
adapter on the base), models that are not local paths (hub ids), and mergekit's other
methods. Model paths are read as mergekit reads them: relative to the current directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r2m_ext.errors import R2MError
from r2m_ext.io.lora import is_adapter
from r2m_ext.methods.mergekit_semantics import (
    MERGEKIT_METHODS,
    check_parameter_settings,
    settings_json,
)

# Keys of mergekit's MergeConfiguration that r2m_ext honours, and those it refuses, with why.
_HONOURED = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_REFUSED = {
    "slices": "layer stacking (slices/passthrough) is not a parameter-space merge r2m_ext runs",
    "modules": "per-module layer stacking is not a parameter-space merge r2m_ext runs",
    "tokenizer_source": "tokenizer surgery is not done; the base's tokenizer files are copied",
    "tokenizer": "tokenizer surgery is not done; the base's tokenizer files are copied",
    "chat_template": "chat templates are not written; the base's tokenizer files are copied",
}
# mergekit's dtype names (mergekit.common.dtype_from_name) that a float merge can use.
_DTYPES = ("bfloat16", "float16", "float32", "float64")


def is_mergekit_config(document: Mapping) -> bool:
    """A mergekit config names its `merge_method`; an r2m_ext recipe never does."""
    return "merge_method" in document


def _dtype(value: Any, key: str, path: Path) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise R2MError(f"{path}: '{key}: {value}' is not a float dtype ({', '.join(_DTYPES)})")
    return name


def _local(reference: str, key: str, path: Path) -> Path:
    """A model path as mergekit resolves it: against the current directory."""
    local = Path(reference)
    if not local.exists():
        raise R2MError(
            f"{path}: '{key}: {reference}' is not a local path; r2m_ext reads local files only "
            "(download the model, e.g. with `huggingface-cli download`, and give its directory)"
        )
    return local.resolve()


def _model_reference(reference: Any, key: str, path: Path) -> tuple[Path, Path | None]:
    """(model, LoRA adapter or None) of a mergekit model reference `MODEL[+LORA]`."""
    if not isinstance(reference, str) or not reference:
        raise R2MError(f"{path}: '{key}' must be a model path")
    if Path(reference).exists():  # a path that holds a "+" itself
        return Path(reference).resolve(), None
    chunks = reference.split("+")
    if len(chunks) > 2:
        raise R2MError(f"{path}: '{key}: {reference}' is not MODEL or MODEL+LORA")
    lora = _local(chunks[1], key, path) if len(chunks) == 2 else None
    if lora is not None and not is_adapter(lora):
        raise R2MError(f"{path}: '{key}: {reference}': {chunks[1]} is not a PEFT LoRA adapter")
    return _local(chunks[0], key, path), lora


def _settings(value: Any, where: str, path: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise R2MError(f"{path}: '{where}' must be a mapping of parameter names to values")
    return value


def load_mergekit_config(path: Path, document: Mapping) -> dict:
    """The merge a mergekit config describes, as load_recipe's fields: the base, the experts, and
    the options of method "mergekit" (every tensor merged: no heads)."""
    for key, why in _REFUSED.items():
        if document.get(key):
            raise R2MError(f"{path}: mergekit key '{key}' is not supported: {why}")
    unknown = sorted(str(k) for k in document if k not in _HONOURED and k not in _REFUSED)
    if unknown:
        raise R2MError(f"{path}: unknown mergekit config key(s) {', '.join(unknown)}")
    method = document["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise R2MError(
            f"{path}: mergekit's merge_method {method!r} is not supported by r2m merge --config "
            f"(supported: {', '.join(MERGEKIT_METHODS)}; r2m_ext's own methods: r2m merge --help)"
        )
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise R2MError(f"{path}: 'models' must list the models to merge")
    # (model, adapter or None, settings) per listed model
    entries: list[tuple[Path, Path | None, dict]] = []
    for index, item in enumerate(models):
        where = f"models[{index}]"
        if not isinstance(item, dict) or "model" not in item:
            raise R2MError(f"{path}: '{where}' must be a mapping with 'model'")
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise R2MError(f"{path}: unknown key(s) {', '.join(extra)} in '{where}'")
        model, lora = _model_reference(item["model"], f"{where}.model", path)
        if any((model, lora) == (seen, seen_lora) for seen, seen_lora, _ in entries):
            raise R2MError(f"{path}: '{where}.model' lists {item['model']} a second time")
        settings = _settings(item.get("parameters"), f"{where}.parameters", path)
        entries.append((model, lora, settings))

    base_reference = document.get("base_model")
    if base_reference is None and method != "linear":
        raise R2MError(f"{path}: mergekit's {method} needs a 'base_model'")
    if base_reference is None:
        if entries[0][1] is not None:
            raise R2MError(f"{path}: models[0] is the base of a linear merge: not a model+lora")
        base, _, base_settings = entries.pop(0)  # linear: every model is an input alike
    else:
        base, base_lora = _model_reference(base_reference, "base_model", path)
        if base_lora is not None:
            raise R2MError(f"{path}: 'base_model: {base_reference}': the base cannot be model+lora")
        listed = [settings for model, lora, settings in entries if (model, lora) == (base, None)]
        entries = [entry for entry in entries if (entry[0], entry[1]) != (base, None)]
        base_settings = listed[0] if listed else {}
    for model, lora, _ in entries:
        if lora is not None and model != base:
            raise R2MError(
                f"{path}: '{model}+{lora}': r2m_ext applies a LoRA adapter to the merge's base "
                f"({base}) only; merge it into {model} first"
            )
    if not entries:
        raise R2MError(f"{path}: 'models' lists no model besides the base")
    # An expert is a model, or a LoRA adapter on the base (read as PEFT merges it: io/lora.py).
    experts = [(lora or model, settings) for model, lora, settings in entries]

    shared = _settings(document.get("parameters"), "parameters", path)
    labelled = [("parameters", shared), ("base_model", base_settings)]
    labelled += [(f"models[{i}].parameters", s) for i, (_, s) in enumerate(experts)]
    for where, settings in labelled:
        check_parameter_settings(settings, method, f"{path}: {where}")
    weighted = [("base_model", base_settings)] if method == "linear" else []
    weighted += [(str(expert), settings) for expert, settings in experts]
    for who, settings in weighted:
        if "weight" not in settings and "weight" not in shared:
            raise R2MError(f"{path}: no 'weight' for {who} (mergekit's {method} requires one)")

    dtype = _dtype(document.get("dtype"), "dtype", path)
    out_dtype = _dtype(document.get("out_dtype"), "out_dtype", path) or dtype
    options: dict[str, Any] = {
        "mergekit_method": method,
        "mergekit_parameters": settings_json(shared, [base_settings, *(s for _, s in experts)]),
        "head_patterns": [],
        "compute_dtype": "float64" if dtype == "float64" else "float32",
    }
    if out_dtype is not None:
        options["out_dtype"] = out_dtype
    return {
        "method": "mergekit",
        "base": str(base),
        "experts": [str(expert) for expert, _ in experts],
        "out": None,
        "shard_size": None,
        "options": options,
    }
