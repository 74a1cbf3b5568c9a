"""The recipe file, r2m_recipe.yaml: the exact method, options and inputs of a merge. `r2m merge`
writes it beside every output and `r2m merge --config` reads the same format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from r2m_ext._version import __version__
from r2m_ext.errors import R2MError
from r2m_ext.options import MergeOptions

RECIPE_FILE = "r2m_recipe.yaml"
_TOP_LEVEL = {"r2m_ext_version", "method", "base", "experts", "out", "options", "shard_size"}


@dataclass(frozen=True)
class Recipe:
    base: str
    experts: tuple[str, ...]
    options: MergeOptions
    shard_size: int
    out: str | None = None

    def to_yaml(self) -> str:
        options = self.options.to_dict()
        document = {
            "r2m_ext_version": __version__,
            "method": options.pop("method"),
            "base": self.base,
            "experts": list(self.experts),
            "out": self.out,
            "shard_size": self.shard_size,
            "options": options,
        }
        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)

    def identity(self) -> dict:
        """What makes two runs produce the same output: inputs, method, options, shard size."""
        return {
            "base": self.base,
            "experts": list(self.experts),
            "shard_size": self.shard_size,
            **self.options.to_dict(),
        }


def load_recipe(path: str | Path) -> dict:
    """The recipe's fields as plain values (paths resolved against the recipe's directory), for
    the caller to merge with command-line overrides before resolving options."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise R2MError(f"{path}: cannot read recipe ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise R2MError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise R2MError(f"{path}: a recipe is a mapping with method, base, experts and options")
    unknown = sorted(set(document) - _TOP_LEVEL)
    if unknown:
        raise R2MError(f"{path}: unknown recipe field(s) {', '.join(unknown)}")
    options = document.get("options") or {}
    if not isinstance(options, dict):
        raise R2MError(f"{path}: 'options' must be a mapping of option names to values")
    experts = document.get("experts") or []
    if not isinstance(experts, list):
        raise R2MError(f"{path}: 'experts' must be a list of paths")

    def resolve(value):
        return None if value is None else str((path.parent / str(value)).resolve())

    return {
        "method": document.get("method", "r2m"),
        "base": resolve(document.get("base")),
        "experts": [resolve(e) for e in experts],
        "out": resolve(document.get("out")),
        "shard_size": document.get("shard_size"),
        "options": options,
    }
