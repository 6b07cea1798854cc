"""Full-rank training: the base Method's answers (nothing wrapped, no restarts, warm-up + cosine)."""

from relora_ds.methods.base import Method


class FullRank(Method):
    name = "full"
