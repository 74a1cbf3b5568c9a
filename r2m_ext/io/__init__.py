"""Checkpoint reading and atomic shard writing. Knows no merge math."""

from r2m_ext.io.checkpoint import Checkpoint
from r2m_ext.io.writer import ShardWriter, parse_size

__all__ = ["Checkpoint", "ShardWriter", "parse_size"]
