"""Weighted mixtures of sources (data.mixture): which source each training row comes from, resumable in O(1).

    data:
      mixture:
        - {source: /data/web-packed, weight: 0.7}
        - {source: /data/code, weight: 0.3, text_column: content}

Each entry is a source read by the rules of data.source, with data.*'s format, text_column, split, hub_config,
validation_source and validation_split unless the entry sets its own (`component_configs`). Weights are normalized;
a weight may be 0 (a source dropped in a later phase of the run).

The blend: the global rows of the run are numbered in the order the ranks take them (micro-step i, rank r, slot j:
g = (i·world + r)·mb + j). Row g goes to the component whose share falls furthest behind its weight,
w_d·(g − g₀ + 1) − (c_d − c₀_d), ties to the lower index (the greedy rule of Megatron-LM's blended datasets). Every
prefix of the run then holds each component within one row of its weight; g₀ and c₀ are where the current weights
took effect (0 for a fresh run). Component d's k-th row is position k mod n_d of the permutation
numpy.random.default_rng([seed, d, k // n_d]).permutation(n_d): each component has epochs of its own.

The position is (g, each component's row count, the phase's g₀ and c₀), so a resume continues in O(1) on any world
size. A resume may change the weights (a new phase starts where it resumes, e.g. an annealing mix); the sources, in
order, must stay the same.

With data.streaming every entry is a stream (stream.py) and the blend is each reader's own: a reader (of the
N = world size × max(1, data.num_workers)) reads its share of every source and fills each of its micro-batches row
by row by the same greedy rule over its own rows (`MixedShareBatches`), so each reader's rows, and each micro-batch,
hold each source within a row or two of its weight, and the run's within N rows. Its state is its rows, its phase and
each source's reader state; it resumes onto the same N, like any stream.

Held-out: data.validation_source when set; else each entry's own held-out set, evaluated one by one, each logged as
`loss_<name>` beside their mean weighted by the mixture's weights (callbacks/evaluation.py). An entry's name is its
`name`, else its source's last path part without extensions.
"""

import dataclasses
import math
import re

import numpy as np
import torch

from relora_ds.data import DATA_FORMATS, DataError, epoch_permutation
from relora_ds.data.stream import ShareBatches

# What an entry may set besides source, weight and name: data.* fields, each defaulting to data.*'s value.
ENTRY_FIELDS = ("format", "text_column", "split", "hub_config", "validation_source", "validation_split")
ENTRY_KEYS = ("source", "weight", "name", *ENTRY_FIELDS)
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a name goes into metric keys (loss_<name>)
EXTENSIONS = (".gz", ".jsonl", ".json", ".txt", ".text", ".parquet")


def entry_name(entry: dict) -> str:
    """The entry's `name`, else the last part of its source without extensions ('/data/code.jsonl.gz' -> 'code',
    'HuggingFaceFW/fineweb-edu' -> 'fineweb-edu')."""
    if entry.get("name") is not None:
        return entry["name"]
    name = str(entry.get("source", "")).rstrip("/").rsplit("/", 1)[-1]
    while name.lower().endswith(EXTENSIONS):
        name = name[:name.rfind(".")]
    return name


def mixture_errors(data_cfg) -> list[str]:
    """Every problem with data.mixture, one line each (config.validate)."""
    mixture = data_cfg.mixture
    if not mixture:
        return []
    errors = []
    if data_cfg.source != "sotu":
        errors.append(f"data.source {data_cfg.source!r} and data.mixture: set one of them (a mixture names its "
                      f"sources in its entries)")
    weights = []
    for i, entry in enumerate(mixture):
        where = f"data.mixture[{i}]"  # each entry is a mapping (config's type check)
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(ENTRY_KEYS)})")
        source = entry.get("source")
        if not isinstance(source, str) or not source.strip():
            errors.append(f"{where}.source: expected a non-empty string, got {source!r}")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            errors.append(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
        else:
            weights.append(weight)
        for key in ENTRY_FIELDS:
            value = entry.get(key)
            if key in entry and value is not None and not isinstance(value, str):
                errors.append(f"{where}.{key}: expected a string, got {value!r}")
        if isinstance(entry.get("format"), str) and entry["format"] not in DATA_FORMATS:
            errors.append(f"{where}.format: must be one of {', '.join(DATA_FORMATS)}, got {entry['format']!r}")
    if len(weights) == len(mixture) and not sum(weights) > 0:
        errors.append(f"data.mixture: the weights must not all be 0, got {weights}")
    if errors:  # the names come from the entries
        return errors
    names = [entry_name(entry) for entry in mixture]
    bad = [n for n in names if not NAME.fullmatch(n)]
    if bad:
        errors.append(f"data.mixture: the name(s) {', '.join(map(repr, bad))} are not made of letters, digits, "
                      f"'_', '.' and '-'; give the entry a name")
    elif len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        errors.append(f"data.mixture: several entries are named {', '.join(map(repr, twice))}; give each a name")
    return errors


def component_configs(data_cfg) -> list[tuple[object, float, str]]:
    """(a data config that reads the entry as data.source, its weight, its name) for each entry of data.mixture."""
    out = []
    for entry in data_cfg.mixture:
        fields = {key: entry[key] for key in ENTRY_FIELDS if key in entry}
        out.append((dataclasses.replace(data_cfg, source=entry["source"], mixture=[], **fields),
                    float(entry["weight"]), entry_name(entry)))
    return out


def normalized(weights) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def assign(weights: list[float], rows: list[int], phase_start: int, phase_rows: list[int], start: int,
           count: int) -> list[tuple[int, int]]:
    """(component, that component's row number) for global rows start .. start + count - 1, by the greedy rule
    (module docstring); `rows` (each component's rows before `start`) is advanced in place."""
    picks = []
    taken = [r - p for r, p in zip(rows, phase_rows)]  # rows since the weights took effect
    for g in range(start, start + count):
        t = g - phase_start + 1
        deficits = [w * t - c for w, c in zip(weights, taken)]
        d = deficits.index(max(deficits))  # the first maximum: the lowest index
        picks.append((d, rows[d]))
        rows[d] += 1
        taken[d] += 1
    return picks


class MixedDataset:
    """Datasets with weights and names: the training blend's packed components (loader.PackedDataset), or the
    entries' held-out sets. `sources` are the entries' source strings (what a resume checks), `names` their names."""

    def __init__(self, components: list, weights: list[float], names: list[str], sources: list[str]):
        if len({c.seq_len for c in components}) != 1:
            raise DataError(f"data.mixture: the sources have different seq_len ({[c.seq_len for c in components]})")
        self.components, self.names, self.sources = components, names, sources
        self.weights = normalized(weights)
        self.seq_len = components[0].seq_len

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.components)

    def describe(self) -> list[dict]:
        return [{"name": name, "source": source, "weight": w, "num_tokens": c.num_tokens}
                for name, source, w, c in zip(self.names, self.sources, self.weights, self.components)]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {w:.3g}" for n, w in zip(self.names, self.weights))
        return f"MixedDataset({{{parts}}}, seq_len={self.seq_len})"


def read_rows(components: list, picks: list[tuple[int, int]], seq_len: int, position) -> torch.Tensor:
    """LongTensor[len(picks), seq_len]: row `position(d, k)` of component d for each (d, k), in the picks' order."""
    out = torch.empty(len(picks), seq_len, dtype=torch.long)
    for d in sorted({d for d, _ in picks}):
        slots = [i for i, (c, _) in enumerate(picks) if c == d]
        positions = np.array([position(d, picks[i][1]) for i in slots], dtype=np.int64)
        order = np.argsort(positions, kind="stable")  # sorted reads
        out[torch.as_tensor(np.asarray(slots)[order])] = components[d].get_batch(positions[order])
    return out


class MixtureOrder:
    """The training blend's position and this rank's micro-batches (DistributedBatches with a MixedDataset)."""

    def __init__(self, dataset: MixedDataset, *, seed: int, micro_batch_size: int, rank: int, world_size: int):
        self.dataset, self.seed, self.mb, self.rank, self.world = dataset, seed, micro_batch_size, rank, world_size
        k = len(dataset.components)
        self.position, self.rows = 0, [0] * k  # global rows taken, and of each component
        self.phase_start, self.phase_rows = 0, [0] * k  # where the current weights took effect
        self.weights = dataset.weights
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # component -> (epoch, its permutation)

    def skip(self) -> list[tuple[int, int]]:
        """Move on by one global micro-batch; returns its picks, unread (data.skip reads none)."""
        picks = assign(self.weights, self.rows, self.phase_start, self.phase_rows, self.position,
                       self.world * self.mb)
        self.position += self.world * self.mb
        return picks

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch and each row's source (its index in the mixture)."""
        mine = self.skip()[self.rank * self.mb:(self.rank + 1) * self.mb]
        sources = torch.tensor([d for d, _ in mine], dtype=torch.long)
        return read_rows(self.dataset.components, mine, self.dataset.seq_len, self._position), sources

    def _position(self, d: int, k: int) -> int:
        n = len(self.dataset.components[d])
        epoch = k // n
        if self._perms.get(d, (None,))[0] != epoch:
            self._perms[d] = (epoch, epoch_permutation([self.seed, d, epoch], n))
        return int(self._perms[d][1][k % n])

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"position": self.position, "weights": self.weights,
                "phase": {"position": self.phase_start, "rows": list(self.phase_rows)},
                "components": [{"source": name, "num_sequences": len(c), "rows": rows}
                               for name, c, rows in zip(ds.sources, ds.components, self.rows)]}

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        saved = state["components"]
        if [c["source"] for c in saved] != ds.sources:
            raise DataError(f"data.mixture: the checkpoint's data position is for the sources "
                            f"{[c['source'] for c in saved]} and this run has {ds.sources}; a resume may change the "
                            f"weights, not the sources or their order")
        for c, component in zip(saved, ds.components):
            if c["num_sequences"] != len(component):
                raise DataError(f"data.mixture: the checkpoint's data position is for {c['num_sequences']} packed "
                                f"sequences of {c['source']!r} but it now has {len(component)} (the source, "
                                f"data.seq_len or data.tokenizer changed)")
        self.position, self.rows = int(state["position"]), [int(c["rows"]) for c in saved]
        self.phase_start, self.phase_rows = resumed_phase(state, self.weights, self.position, self.rows)
        if not same_weights(state["weights"], self.weights) and self.rank == 0:
            print(f"data.mixture: the weights change from {show(state['weights'])} to {show(self.weights)} "
                  f"at row {self.position} of the run", flush=True)
        self._perms = {}


def show(weights) -> str:
    return "[" + ", ".join(f"{w:.4g}" for w in weights) + "]"


def same_weights(saved, now) -> bool:
    """Whether a saved state's (normalized) weights are this run's: else a new phase starts."""
    return bool(np.allclose(saved, now, rtol=0, atol=1e-12))


def resumed_phase(state: dict, weights: list[float], position: int, rows: list[int]) -> tuple[int, list[int]]:
    """(g₀, c₀) after a resume from `state` (its "weights" and "phase"): the saved phase with the same weights, else a
    new one from here (`position`, `rows`)."""
    if same_weights(state["weights"], weights):
        return int(state["phase"]["position"]), list(state["phase"]["rows"])
    return position, list(rows)


class MixedSource:
    """The entries' stream sources (sources.Source) with weights and names: what a rank's readers read with
    data.streaming (workers.RankStream, one MixedShareBatches per reader)."""

    def __init__(self, sources: list, weights: list[float], names: list[str]):
        self.sources, self.names, self.weights = sources, names, normalized(weights)
        self.name = "mixture of " + ", ".join(names)
        self.kind = "hub" if any(src.kind == "hub" for src in sources) else "files"  # a hub's workers reset a lock

    def identity(self) -> str:
        """The entries' identities, in order; not the weights, which a resume may change."""
        return "mixture:" + ",".join(src.identity() for src in self.sources)

    def describe(self) -> list[dict]:
        return [{"name": name, "source": src.name, "weight": w}
                for name, src, w in zip(self.names, self.sources, self.weights)]


class MixedShareBatches:
    """One reader's micro-batches of a MixedSource, each as (rows, each row's source index) with the reader's state
    after it: its share of every source (stream.ShareBatches, one window at a time), row by row by the greedy rule
    over the reader's own rows.

    state: {"position": the reader's rows handed out, "rows": each source's, "weights",
            "phase": {"position", "rows"}, "shares": [each source's ShareBatches state]}"""

    def __init__(self, src: MixedSource, *, tokenizer, seq_len: int, micro_batch_size: int, reader: int = 0,
                 readers: int = 1, state: dict | None = None):
        k = len(src.sources)
        state = state or {"position": 0, "rows": [0] * k, "weights": src.weights,
                          "phase": {"position": 0, "rows": [0] * k}, "shares": [None] * k}
        self.src, self.mb, self.state = src, micro_batch_size, state
        self.parts = [ShareBatches(part, tokenizer=tokenizer, seq_len=seq_len, micro_batch_size=1, reader=reader,
                                   readers=readers, state=share) for part, share in zip(src.sources, state["shares"])]

    def __iter__(self):
        position, rows, shares = self.state["position"], list(self.state["rows"]), list(self.state["shares"])
        phase_start, phase_rows = resumed_phase(self.state, self.src.weights, position, rows)
        windows = [iter(part) for part in self.parts]
        while True:
            picks = assign(self.src.weights, rows, phase_start, phase_rows, position, self.mb)
            position += self.mb
            batch = []
            for d, _ in picks:
                window, shares[d] = next(windows[d])
                batch.append(window)
            sources = torch.tensor([d for d, _ in picks], dtype=torch.long)
            yield (torch.cat(batch), sources), {"position": position, "rows": list(rows), "weights": self.src.weights,
                                     "phase": {"position": phase_start, "rows": list(phase_rows)},
                                     "shares": list(shares)}


def described(dataset) -> list[dict] | None:
    """Each source's name, source and weight (and tokens, map-style) of a training mixture; None for one source."""
    if isinstance(dataset, MixedDataset):
        return dataset.describe()
    source = getattr(dataset, "source", None)  # a stream (loader.StreamingPackedDataset)
    return source.describe() if isinstance(source, MixedSource) else None


def jsonable_share(state: dict | None) -> dict | None:
    """A reader's state (stream.ShareBatches' or MixedShareBatches') with its token buffers as lists (JSON)."""
    if state is None:
        return None
    if "shares" in state:
        return {**state, "shares": [jsonable_share(share) for share in state["shares"]]}
    return {**state, "buffer": np.asarray(state["buffer"]).tolist()}
