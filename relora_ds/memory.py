"""Peak memory of this process, phase by phase: what a run logs and the scale benchmark tabulates.

    phases = PhaseMemory(device)
    ...build...
    phases.end("build")      # -> peak bytes since the previous end(), then the peak is reset

On CUDA the peak is torch.cuda.max_memory_allocated (reset with reset_peak_memory_stats); on CPU it is the
resident-set high-water mark VmHWM of /proc/self/status, reset by writing "5" to /proc/self/clear_refs (Linux
3.14+). Where neither can be read or reset (another OS), the peak is the current RSS from psutil, or None.
"""

import re

GIB = 2**30


def current_rss() -> int | None:
    """Resident set size of this process in bytes, or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def rss_high_water_mark() -> int | None:
    """VmHWM in bytes (the peak RSS since the process started or since the last reset), or None."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def reset_rss_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    """Peak bytes of each phase of a run on this rank (see the module docstring)."""

    def __init__(self, device=None):
        import torch

        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.device = device
        self.resettable = self.cuda or reset_rss_high_water_mark()

    def peak(self) -> int | None:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            return rss_high_water_mark()
        return current_rss()

    def end(self, phase: str) -> int | None:
        """The peak of the phase that just ended (bytes), then start the next phase's count."""
        value = self.peak()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            reset_rss_high_water_mark()
        return value

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else ("rss_peak" if self.resettable else "rss_now")



def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Called after the phases that free large host tensors (build, the warm-start switch, a resume): without it a
    CPU rank's RSS keeps the freed pages of a module built whole before partitioning, or of the full-rank
    optimizer, and the next phase's peak stacks on top of them.
    """
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim(0); a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def heap_bytes():
    """A torch dispatch mode that tracks the peak of the bytes this process has allocated (glibc's mallinfo2: heap
    chunks in use plus mmapped blocks) above what it held on entry, sampled after every torch op. It sees every
    allocation, however a tensor came by its storage (DeepSpeed moves gradients by assigning `.data`), and Python's
    objects besides; not work memory a kernel frees within one op. glibc only (Linux). mallinfo2 walks the heap's free
    lists: in a long-lived process with a large, fragmented heap each sample costs milliseconds, so measure in a
    process of its own (benchmarks/plan_terms.py).

        with heap_bytes() as heap:
            work()
        heap.peak, heap.live        # bytes
    """
    import ctypes

    from torch.utils._python_dispatch import TorchDispatchMode

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2

    def allocated() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    class HeapBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.start = allocated()
            self.peak = 0

        @property
        def live(self) -> int:
            return allocated() - self.start

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, self.live)
            return out

    return HeapBytes()


def returns_freed_host_memory(zero_stage: int, stores_weight: bool, cuda: bool) -> bool:
    """Whether a run calls `fix_heap_threshold` (its freed host tensors returned to the OS at once): CPU ranks on
    ZeRO-3 (the gather/free churn) or with a stored W (each matmul's dequantized copy). The trainer acts on it and
    `relora-ds plan` counts with it."""
    return not cuda and (zero_stage == 3 or stores_weight)


def fix_heap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every host allocation of `nbytes` or more with its own mmap, returned to the OS when freed (glibc's
    M_MMAP_THRESHOLD through mallopt; False where that is unavailable).

    glibc raises this threshold by itself up to 32 MiB after large frees, so the tensors a ZeRO-3 rank gathers and
    frees layer by layer (a few MiB each) land on the heap and their pages stay resident: measured on the 350m
    preset with 2 CPU ranks, a steady 5.0 GiB per rank instead of 3.7 GiB (benchmarks/README.md, "Scale"). Call
    it before the model is built; it changes only allocations made afterwards.
    """
    import ctypes

    M_MMAP_THRESHOLD = -3
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
