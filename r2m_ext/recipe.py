"""The recipe file, r2m_recipe.yaml: the exact method, options and inputs of a merge. `r2m merge`
writes it beside every output and `r2m merge --config` reads the same format (or a mergekit
YAML, told apart by its `merge_method` key: integrations/mergekit_config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from r2m_ext._version import __version__
from r2m_ext.errors import R2MError
from r2m_ext.integrations.mergekit_config import is_mergekit_config, load_mergekit_config
from r2m_ext.io.paths import require_regular_file, resolved
from r2m_ext.options import MergeOptions

RECIPE_FILE = "r2m_recipe.yaml"
# What a merge writes: a whole model (safetensors shards) or a PEFT LoRA adapter.
OUT_FORMATS = ("safetensors", "peft")
_TOP_LEVEL = {
    "r2m_ext_version",
    "method",
    "base",
    "experts",
    "out",
    "options",
    "shard_size",
    "out_format",
    "max_rank",
}


@dataclass(frozen=True)
class Recipe:
    base: str
    experts: tuple[str, ...]
    options: MergeOptions
    shard_size: int
    out: str | None = None
    out_format: str = "safetensors"  # or "peft": a LoRA adapter (io/adapter_output.py)
    max_rank: int | None = None

    def _output_fields(self) -> dict:
        """How the output is written, where it is not a whole model (so that the recipes of
        whole-model merges stay as they were)."""
        if self.out_format == "safetensors" and self.max_rank is None:
            return {}
        return {"out_format": self.out_format, "max_rank": self.max_rank}

    def to_yaml(self) -> str:
        options = self.options.to_dict()
        document = {
            "r2m_ext_version": __version__,
            "method": options.pop("method"),
            "base": self.base,
            "experts": list(self.experts),
            "out": self.out,
            "shard_size": self.shard_size,
            **self._output_fields(),
            "options": options,
        }
        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)

    def identity(self) -> dict:
        """What makes two runs produce the same output: inputs, method, options, shard size."""
        return {
            "base": self.base,
            "experts": list(self.experts),
            "shard_size": self.shard_size,
            **self._output_fields(),
            **self.options.to_dict(),
        }


def _read_document(path: Path) -> dict:
    require_regular_file(path, "recipe")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise R2MError(f"{path}: cannot read recipe ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise R2MError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        document = yaml.safe_load(text)
    # ValueError: a scalar YAML reads as a value it cannot build (the date 2001-02-30).
    except (yaml.YAMLError, ValueError, OverflowError) as error:
        raise R2MError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise R2MError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(document, dict):
        raise R2MError(f"{path}: a recipe is a mapping with method, base, experts and options")
    return document


def load_recipe(path: str | Path) -> dict:
    """The recipe's fields as plain values (paths resolved against the recipe's directory), for
    the caller to merge with command-line overrides before resolving options. Every field is
    checked for its type here: a recipe may come from anywhere."""
    path = Path(path)
    document = _read_document(path)
    if is_mergekit_config(document):
        return load_mergekit_config(path, document)
    unknown = sorted(str(key) for key in set(document) - _TOP_LEVEL)
    if unknown:
        raise R2MError(f"{path}: unknown recipe field(s) {', '.join(unknown)}")
    options = document.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(name, str) for name in options):
        raise R2MError(f"{path}: 'options' must be a mapping of option names to values")
    experts = document.get("experts") or []
    if not isinstance(experts, list) or not all(isinstance(e, str) and e for e in experts):
        raise R2MError(f"{path}: 'experts' must be a list of paths")
    for field in ("method", "base", "out"):
        if document.get(field) is not None and not isinstance(document[field], str):
            raise R2MError(f"{path}: '{field}' must be a string, got {document[field]!r}")
    shard_size = document.get("shard_size")
    if shard_size is not None and (
        isinstance(shard_size, bool) or not isinstance(shard_size, (int, str))
    ):
        raise R2MError(f"{path}: 'shard_size' must be a size like 5GB, got {shard_size!r}")
    if document.get("out_format") not in (None, *OUT_FORMATS):
        raise R2MError(f"{path}: 'out_format' must be one of {', '.join(OUT_FORMATS)}")
    max_rank = document.get("max_rank")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int)):
        raise R2MError(f"{path}: 'max_rank' must be an integer, got {max_rank!r}")

    def resolve(value):
        return None if value is None else str(resolved(path.parent / value))

    return {
        "method": document.get("method", "r2m"),
        "base": resolve(document.get("base")),
        "experts": [resolve(e) for e in experts],
        "out": resolve(document.get("out")),
        "shard_size": shard_size,
        "out_format": document.get("out_format"),
        "max_rank": max_rank,
        "options": options,
    }
