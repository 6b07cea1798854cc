"""Stand-ins in single-process unit tests: DeepSpeed objects, output streams that are or are not a terminal, and a
packed dataset whose rows name themselves.

    engine = FakeEngine(optimizer, stage=2)        # what zero.layout_for and check_engine_settings read
    monkeypatch.setattr(sys, "stderr", Terminal())  # progress draws a bar there; Redirected(): plain lines
    Rows(1, 40).get_batch([3])                     # [[10003, 10003, 10003, 10003]]
"""

import io

import numpy as np
import torch

SEQ = 4  # Rows' sequence length


class Terminal(io.StringIO):
    """A stream that says it is a terminal (tqdm draws its bar there)."""

    def isatty(self):
        return True


class Redirected(io.StringIO):
    """A stream redirected to a file (SLURM, nohup): not a terminal."""

    def isatty(self):
        return False


class FakeEngine:
    """The DeepSpeed engine methods that zero.layout_for and zero.check_engine_settings read; every ZeRO-3 extra
    (hpZ, quantized weights, offload) off unless asked for."""

    def __init__(self, optimizer=None, stage=0, fp16=False, hpz=1, quantized=False, offload=None):
        self.optimizer, self.stage, self.fp16 = optimizer, stage, fp16
        self.hpz, self.quantized, self.offload = hpz, quantized, offload

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self.fp16

    def optimizer_name(self):
        return "adamw"

    def zero_hpz_partition_size(self):
        return self.hpz

    def zero_quantized_weights(self):
        return self.quantized

    def zero_quantized_nontrainable_weights(self):
        return False

    def zero_offload_param(self):
        return self.offload

    def zero_offload_optimizer(self):
        return None


class Rows:
    """A packed dataset whose row i of component c is [c·10⁴ + i] * SEQ, so every row read names itself."""

    def __init__(self, component: int, n: int):
        self.component, self.n, self.seq_len = component, n, SEQ

    def __len__(self):
        return self.n

    @property
    def num_tokens(self):
        return self.n * SEQ

    def head(self, count):
        return self.get_batch(range(min(count, self.n)))

    def get_batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        assert len(idx) == 0 or int(idx.max()) < self.n
        return (self.component * 10_000 + idx).unsqueeze(1).repeat(1, SEQ)
