"""Reading models (TensorSources: checkpoints on disk, state dicts in memory) and atomic shard
writing. Knows no merge math."""

from r2m_ext.io.checkpoint import Checkpoint
from r2m_ext.io.lora import LoraSource
from r2m_ext.io.source import StateDictSource, TensorSource, open_source
from r2m_ext.io.writer import ShardWriter, parse_size

__all__ = [
    "Checkpoint",
    "LoraSource",
    "ShardWriter",
    "StateDictSource",
    "TensorSource",
    "open_source",
    "parse_size",
]
