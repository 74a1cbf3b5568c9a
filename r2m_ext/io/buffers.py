"""Reusable host buffers: for positioned tensor reads (most reads map the file instead, see
io/safetensors_format.py; these serve data whose offset does not suit its dtype's alignment) and
for the engine's stacks of task vectors (engine/inputs.py).

A fresh buffer for every use is a fresh mapping (the engine returns large frees to the OS, see
engine/budget.py, and glibc maps anything over 32 MB on its own anyway), and the kernel then
faults in and zero-fills every 4 KB page before the data is written over it: for reads, 879k page
faults and 2.2 s of system time for one average merge of 8 ViT-B/16 experts (3.1 GB), against
0.7 s for the read itself; for a stack of 8 task vectors of 3072 x 768, 48-52 ms to form into
fresh memory against 8-12 ms into a kept buffer. These buffers are kept and handed out again once
every tensor that viewed them is gone."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

# A free buffer serves a request of at least this fraction of its size, so that reuse never holds
# much more memory than the request needs.
MIN_FILL = 0.5


class HostBuffers:
    """Byte buffers handed out as uint8 tensors and taken back when the last tensor viewing one is
    freed. At most `retain_bytes` of free buffers are kept (counted outside the merge budget: this
    is what peak memory may exceed the budget by); beyond that they go back to the OS."""

    def __init__(self, retain_bytes: int):
        self.retain_bytes = retain_bytes
        self._free: list[np.ndarray] = []
        self._free_bytes = 0
        # Re-entrant: a give-back can run inside take() when a dropped tensor is freed there.
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for index, block in enumerate(self._free):
                fits = MIN_FILL * block.nbytes <= nbytes <= block.nbytes
                if fits and (best is None or block.nbytes < self._free[best].nbytes):
                    best = index
            if best is not None:
                block = self._free.pop(best)
                self._free_bytes -= block.nbytes
            else:
                block = np.empty(nbytes, dtype=np.uint8)
        view = block[:nbytes]
        # torch.from_numpy keeps `view` alive as long as any tensor shares its storage.
        weakref.finalize(view, self._give_back, block)
        return torch.from_numpy(view)

    def _give_back(self, block: np.ndarray) -> None:
        with self._lock:
            if self._free_bytes + block.nbytes <= self.retain_bytes:
                self._free.append(block)
                self._free_bytes += block.nbytes

    @property
    def free_bytes(self) -> int:
        return self._free_bytes
