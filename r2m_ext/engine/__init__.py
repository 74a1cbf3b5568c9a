"""The merge engine: plans what to read and when, within a memory budget, and runs a method over
it. Knows no merge math (that is r2m_ext/methods) and no file formats (that is r2m_ext/io)."""

from r2m_ext.engine.budget import MemoryBudget
from r2m_ext.engine.inputs import MergeInputs
from r2m_ext.engine.run import run_merge

__all__ = ["MemoryBudget", "MergeInputs", "run_merge"]
