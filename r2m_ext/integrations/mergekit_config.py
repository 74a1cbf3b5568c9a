"""mergekit YAML configs as r2m_ext merges: `r2m merge --config MERGEKIT.yaml` reads a config
written for `mergekit-yaml` and runs it through r2m_ext's streaming engine with the method
"mergekit" (methods/mergekit_semantics.py), which follows mergekit's semantics.

What a config can ask that r2m_ext does not do is refused, naming the key: layer stacking
(`slices`, `modules`), tokenizer surgery (`tokenizer_source`, `tokenizer`, `chat_template`),
LoRA references (`model+lora`), models that are not local paths (hub ids), and mergekit's
other methods. Model paths are read as mergekit reads them: relative to the current directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r2m_ext.errors import R2MError
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


def _model_path(reference: Any, key: str, path: Path) -> Path:
    """A model reference as a local path (mergekit resolves it against the current directory)."""
    if not isinstance(reference, str) or not reference:
        raise R2MError(f"{path}: '{key}' must be a model path")
    if "+" in reference and not Path(reference).exists():
        raise R2MError(
            f"{path}: '{key}: {reference}' applies a LoRA adapter (model+lora), which "
            "r2m merge --config does not do yet: merge the adapter into its model first"
        )
    local = Path(reference)
    if not local.exists():
        raise R2MError(
            f"{path}: '{key}: {reference}' is not a local path; r2m_ext reads local files only "
            "(download the model, e.g. with `huggingface-cli download`, and give its directory)"
        )
    return local.resolve()


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
    entries: list[tuple[Path, dict]] = []
    for index, item in enumerate(models):
        where = f"models[{index}]"
        if not isinstance(item, dict) or "model" not in item:
            raise R2MError(f"{path}: '{where}' must be a mapping with 'model'")
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise R2MError(f"{path}: unknown key(s) {', '.join(extra)} in '{where}'")
        model = _model_path(item["model"], f"{where}.model", path)
        if any(model == seen for seen, _ in entries):
            raise R2MError(f"{path}: '{where}.model' lists {item['model']} a second time")
        entries.append((model, _settings(item.get("parameters"), f"{where}.parameters", path)))

    base_reference = document.get("base_model")
    if base_reference is None and method != "linear":
        raise R2MError(f"{path}: mergekit's {method} needs a 'base_model'")
    if base_reference is None:
        base, base_settings = entries.pop(0)  # linear: every model is an input alike
    else:
        base = _model_path(base_reference, "base_model", path)
        listed = [settings for model, settings in entries if model == base]
        entries = [(model, settings) for model, settings in entries if model != base]
        base_settings = listed[0] if listed else {}
    if not entries:
        raise R2MError(f"{path}: 'models' lists no model besides the base")

    shared = _settings(document.get("parameters"), "parameters", path)
    labelled = [("parameters", shared), ("base_model", base_settings)]
    labelled += [(f"models[{i}].parameters", s) for i, (_, s) in enumerate(entries)]
    for where, settings in labelled:
        check_parameter_settings(settings, method, f"{path}: {where}")
    weighted = [("base_model", base_settings)] if method == "linear" else []
    weighted += [(str(model), settings) for model, settings in entries]
    for who, settings in weighted:
        if "weight" not in settings and "weight" not in shared:
            raise R2MError(f"{path}: no 'weight' for {who} (mergekit's {method} requires one)")

    dtype = _dtype(document.get("dtype"), "dtype", path)
    out_dtype = _dtype(document.get("out_dtype"), "out_dtype", path) or dtype
    options: dict[str, Any] = {
        "mergekit_method": method,
        "mergekit_parameters": settings_json(shared, [base_settings, *(s for _, s in entries)]),
        "head_patterns": [],
        "compute_dtype": "float64" if dtype == "float64" else "float32",
    }
    if out_dtype is not None:
        options["out_dtype"] = out_dtype
    return {
        "method": "mergekit",
        "base": str(base),
        "experts": [str(model) for model, _ in entries],
        "out": None,
        "shard_size": None,
        "options": options,
    }
