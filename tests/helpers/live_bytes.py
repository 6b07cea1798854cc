"""The peak of live CPU tensor bytes while a block runs, counted at the dispatcher.

    with LiveBytes() as live:
        work()
    live.peak, live.live        # bytes

A storage counts from the op that creates it (an output whose storage is none of the op's inputs') until the last
tensor seen on it dies: every op output on a counted storage (views included) holds it, through a weakref
finalizer. Storages not made by a torch op (a file memory-mapped by torch.load, numpy buffers) and meta or other
devices are not counted; neither is work memory a kernel allocates and frees inside one op (LAPACK's, for one).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = {}  # data_ptr -> [nbytes, holders]

    def _release(self, ptr: int) -> None:
        record = self._storages.get(ptr)
        if record is None:
            return
        record[1] -= 1
        if record[1] == 0:
            self.live -= record[0]
            del self._storages[ptr]

    def _hold(self, tensor: torch.Tensor, ptr: int) -> None:
        self._storages[ptr][1] += 1
        weakref.finalize(tensor, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr == 0 or nbytes == 0:
                continue
            if ptr not in self._storages and ptr not in inputs:
                self._storages[ptr] = [nbytes, 0]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            if ptr in self._storages:
                self._hold(t, ptr)
        return out
