"""Code the tests share (fakes, tiny models and runs, rank spawning, memory counters); ROOT: the repository."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
