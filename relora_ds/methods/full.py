"""Full-rank training: the base Method's answers (nothing wrapped, no restarts, warm-up + cosine)."""

from relora_ds.methods.base import Method


class FullRank(Method):
    name = "full"

    @classmethod
    def compare_variants(cls) -> list:
        return [("full", "full-rank training throughout; ΔW measured from step W",
                 lambda base: {"method": "full", "relora.warm_start_steps": 0,
                               "checkpoint.reference_step": base.relora.warm_start_steps})]
