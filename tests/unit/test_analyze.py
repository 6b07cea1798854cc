"""relora_ds/tools/analyze.py on synthetic exported model dirs (safetensors): the numbers (singular values, σ > 0.1
counts, entropy effective rank) of ΔW of known rank, the lockstep checks, spectra.json / spectra.png, the command
line's one-line errors, and the peak of live tensor bytes of an analysis of a model with many layers."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from relora_ds import cli
from relora_ds.tools import analyze
from tests.helpers.live_bytes import LiveBytes

HIDDEN, INTER = 32, 48
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def weight_name(layer: int, projection: str) -> str:
    block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{projection}.weight"


def model_tensors(layers: int, seed: int, hidden: int = HIDDEN, inter: int = INTER) -> dict:
    """A LLaMA-shaped state dict in the model's order (embeddings, per layer: norms and projections, norm, head)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    out = {"model.embed_tokens.weight": torch.randn(50, hidden, generator=g)}
    for layer in range(layers):
        out[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden)
        for projection, shape in shapes.items():
            out[weight_name(layer, projection)] = torch.randn(*shape, generator=g) * 0.02
        out[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden)
    out["model.norm.weight"] = torch.ones(hidden)
    out["lm_head.weight"] = torch.randn(50, hidden, generator=g)
    return out


def low_rank(shape, singular_values, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ with orthonormal U, V: a matrix with exactly these singular values."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def write_model(directory, tensors: dict, shards: int = 1, dtype=torch.float32) -> str:
    """An exported-model dir: config.json and model.safetensors, or `shards` files with an index."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    names = list(tensors)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return str(directory)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({k: tensors[k] for k in part}, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(directory)


# Per projection, the singular values of the ΔW added in each layer (layer l scales them by 1 + l).
KNOWN = {"q_proj": [2.0, 1.0, 0.5, 0.04], "k_proj": [1.0], "v_proj": [0.3, 0.3, 0.3], "o_proj": [],
         "gate_proj": [4.0, 0.2, 0.01], "up_proj": [0.6] * 5, "down_proj": [0.09, 0.08]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(A dir, B dir, {name: expected singular values}): B = A + ΔW of known spectra, embeddings and norms moved too."""
    root = tmp_path_factory.mktemp("pair")
    a = model_tensors(layers=3, seed=0)
    b, expected = {}, {}
    for name, tensor in a.items():
        b[name] = tensor + 0.5 if "layers" not in name or "proj" not in name else tensor.clone()
    for layer in range(3):
        for projection, values in KNOWN.items():
            name = weight_name(layer, projection)
            scaled = [v * (1 + layer) for v in values]
            if scaled:
                b[name] = (a[name].double() + low_rank(SHAPES[projection], scaled, seed=layer * 10 + len(values))).float()
            expected[name] = scaled
    return write_model(root / "a", a), write_model(root / "b", b), expected


def test_effective_rank_and_counts_of_known_spectra():
    assert analyze.effective_rank([0.0, 0.0, 0.0]) == 0.0
    assert analyze.effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert analyze.effective_rank([0.7] * 6 + [0.0] * 10) == pytest.approx(6.0)
    p = torch.tensor([3.0, 1.0]) / 4
    assert analyze.effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert analyze.num_above([0.5, 0.1, 0.100001, 0.02]) == 2
    # From matrices: exactly k equal singular values give effective rank k and k values above 0.1.
    for k in (1, 3, 7):
        sv = torch.linalg.svdvals(low_rank((40, 30), [0.9] * k, seed=k).float())
        e = analyze.entry("model.layers.2.mlp.up_proj.weight", (40, 30), sv)
        assert e["effective_rank"] == pytest.approx(k, rel=1e-4)
        assert e["num_above_0_1"] == k
        assert (e["layer"], e["projection"], e["shape"]) == (2, "up_proj", [40, 30])
        assert len(e["singular_values"]) == 30 and e["singular_values"] == sorted(e["singular_values"], reverse=True)
    assert analyze.layer_index("lm_head.weight") is None


def test_singular_values_of_a_pair_are_those_of_the_known_delta(pair):
    a, b, expected = pair
    result = analyze.analyze_pair(a, b, progress=False)
    assert result["a"] == {"path": a, "resolved": a, "kind": "export", "step": None}
    assert result["targets"] == list(analyze.FAMILIES["llama"].target_modules)  # its config.json's model_type
    names = [e["name"] for e in result["entries"]]
    assert names == [weight_name(layer, p) for layer in range(3) for p in SHAPES]  # model order, projections only
    for e in result["entries"]:
        known = expected[e["name"]]
        got = torch.tensor(e["singular_values"])
        assert len(got) == min(e["shape"])
        torch.testing.assert_close(got[:len(known)], torch.tensor(known, dtype=torch.float32), rtol=1e-4, atol=2e-6)
        assert max(got[len(known):].tolist(), default=0.0) < 1e-5  # the rest is fp32 rounding
        assert e["num_above_0_1"] == sum(v > 0.1 for v in known)
        if known:
            p = torch.tensor(known, dtype=torch.float64) / sum(known)
            assert e["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-3)
        else:  # B's weight is A's: ΔW is exactly zero
            assert e["effective_rank"] == 0.0 and max(e["singular_values"]) == 0.0

    summary = analyze.summarize(result)
    assert summary["num_singular_values"] == sum(min(SHAPES[p]) for p in SHAPES) * 3
    assert summary["num_above_0_1"] == sum(v * (1 + layer) > 0.1 for layer in range(3) for vs in KNOWN.values()
                                           for v in vs)
    assert list(summary["by_projection"]) == list(SHAPES)
    assert summary["by_projection"]["k_proj"] == {"num_above_0_1": 3, "num_singular_values": 3 * HIDDEN,
                                                  "num_weights": 3, "mean_effective_rank": pytest.approx(1.0, rel=1e-3)}

    only = analyze.analyze_pair(a, b, targets=["q_proj", "model.layers.1.mlp.*"], progress=False)
    assert [e["name"] for e in only["entries"]] == [weight_name(0, "q_proj"), weight_name(1, "q_proj"),
                                                   weight_name(1, "gate_proj"), weight_name(1, "up_proj"),
                                                   weight_name(1, "down_proj"), weight_name(2, "q_proj")]


def test_sharded_and_bf16_exports_read_in_model_order(pair, tmp_path):
    a, b, _ = pair
    reference = analyze.analyze_pair(a, b, progress=False)
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(b, "model.safetensors"))
    order = list(model_tensors(layers=3, seed=0))
    sharded = write_model(tmp_path / "sharded", {k: tensors[k] for k in order}, shards=3)
    got = analyze.analyze_pair(a, sharded, progress=False)
    assert [e["singular_values"] for e in got["entries"]] == [e["singular_values"] for e in reference["entries"]]
    half = write_model(tmp_path / "bf16", {k: tensors[k] for k in order}, dtype=torch.bfloat16)
    got = analyze.analyze_pair(half, half, progress=False)
    assert all(max(e["singular_values"]) == 0.0 and e["effective_rank"] == 0.0 and e["num_above_0_1"] == 0
               for e in got["entries"])


def test_models_that_do_not_match_are_one_line_errors(pair, tmp_path):
    a, b, _ = pair
    tensors = model_tensors(layers=2, seed=0)  # a layer fewer
    with pytest.raises(analyze.AnalyzeError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight is in A but not in B"):
        analyze.analyze_pair(a, write_model(tmp_path / "short", tensors), progress=False)
    wide = model_tensors(layers=3, seed=0, inter=INTER + 8)
    with pytest.raises(analyze.AnalyzeError, match=r"gate_proj\.weight: shape \(48, 32\) in A, \(56, 32\) in B"):
        analyze.analyze_pair(a, write_model(tmp_path / "wide", wide), progress=False)
    with pytest.raises(analyze.AnalyzeError, match="no linear weight matches the targets"):
        analyze.analyze_pair(a, b, targets=["nope_proj"], progress=False)
    with pytest.raises(analyze.AnalyzeError, match="no such file or directory"):
        analyze.analyze_pair(a, str(tmp_path / "missing"), progress=False)
    os.makedirs(tmp_path / "bin")
    open(tmp_path / "bin" / "config.json", "w").write("{}")
    with pytest.raises(analyze.AnalyzeError, match="without safetensors weights"):
        analyze.analyze_pair(str(tmp_path / "bin"), b, progress=False)

    # The lockstep itself: names out of order, a stream that ends early or runs on, shapes that differ.
    x, y = torch.zeros(2, 3), torch.zeros(3, 2)
    names = ["a.weight", "b.weight"]
    with pytest.raises(analyze.AnalyzeError, match="B gave b.weight where a.weight was expected"):
        list(analyze.lockstep(iter([("a.weight", x), ("b.weight", x)]), iter([("b.weight", x), ("a.weight", x)]), names))
    with pytest.raises(analyze.AnalyzeError, match="A ended before b.weight"):
        list(analyze.lockstep(iter([("a.weight", x)]), iter([("a.weight", x), ("b.weight", x)]), names))
    with pytest.raises(analyze.AnalyzeError, match="B gave c.weight after the last expected weight"):
        list(analyze.lockstep(iter([("a.weight", x), ("b.weight", x)]),
                              iter([("a.weight", x), ("b.weight", x), ("c.weight", x)]), names))
    with pytest.raises(analyze.AnalyzeError, match=r"b.weight: shape \(2, 3\) in A, \(3, 2\) in B"):
        list(analyze.lockstep(iter([("a.weight", x), ("b.weight", x)]), iter([("a.weight", x), ("b.weight", y)]), names))
    assert [n for n, _, _ in analyze.lockstep(iter([("a.weight", x), ("b.weight", y)]),
                                               iter([("a.weight", x), ("b.weight", y)]), names)] == names


def test_spectra_json_and_png(pair, tmp_path):
    a, b, _ = pair
    results = {"relora": analyze.analyze_pair(a, b, progress=False),
               "none": analyze.analyze_pair(a, a, progress=False)}
    out = tmp_path / "out" / "deeper"
    json_path, png_path = analyze.write_spectra(results, str(out))
    assert (json_path, png_path) == (str(out / "spectra.json"), str(out / "spectra.png"))
    assert sorted(os.listdir(out)) == ["spectra.json", "spectra.png"]  # no temporary files left
    with open(json_path) as f:
        doc = json.load(f)  # well formed (no NaN: allow_nan=False when written)
    assert doc["format"] == "relora-ds spectra v1" and doc["threshold"] == 0.1
    assert "exp(H(p))" in doc["effective_rank"] and "Roy & Vetterli" in doc["effective_rank"]
    from relora_ds import __version__

    assert doc["relora_ds_version"] == __version__
    assert list(doc["runs"]) == ["relora", "none"]
    run = doc["runs"]["relora"]
    assert run["a"]["path"] == a and run["b"]["path"] == b and run["a"]["step"] is None
    assert run["summary"] == json.loads(json.dumps(analyze.summarize(results["relora"])))
    assert len(run["entries"]) == 21
    for e in run["entries"]:
        assert set(e) == {"layer", "projection", "name", "shape", "singular_values", "num_above_0_1",
                          "effective_rank"}
        assert isinstance(e["layer"], int) and e["projection"] in SHAPES
    assert doc["runs"]["none"]["summary"]["num_above_0_1"] == 0
    with open(png_path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000

    with pytest.raises(analyze.AnalyzeError, match="not a directory"):
        analyze.write_spectra(results, json_path)


def test_command_line(pair, tmp_path, capsys):
    a, b, _ = pair
    out = tmp_path / "cli"
    assert cli.main(["analyze", a, b, "--out", str(out), "--no-progress", "--targets", "q_proj,k_proj"]) == 0
    printed = capsys.readouterr().out
    assert "b: 13 of 192 singular values of ΔW above 0.1 over 6 weights" in printed, printed
    with open(out / "spectra.json") as f:
        doc = json.load(f)
    assert list(doc["runs"]) == ["b"] and doc["runs"]["b"]["targets"] == ["q_proj", "k_proj"]
    assert open(out / "spectra.png", "rb").read(8) == PNG_MAGIC

    empty = tmp_path / "empty-run"
    empty.mkdir()
    for argv, message in (([str(empty)], "checkpoint.at_switch"),
                          ([a, str(tmp_path / "nowhere")], "no such file or directory"),
                          ([a, b, a], "expected RUN_DIR or A B, got 3 paths"),
                          ([a, b, "--labels", "x", "y"], "--labels: 2 given for 1 runs"),
                          ([a, b, "--targets", ","], "--targets ','")):
        assert cli.main(["analyze", *argv, "--out", str(tmp_path / "err"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_live_tensor_bytes_stay_a_few_projections_on_a_model_of_many_layers(tmp_path):
    """16 layers of 64/160 projections (3 MB per side): the analysis holds a few tensors the size of the largest
    projection (160 x 64 fp32 = 40 KB), not a side's weights; the same counter sees a whole side when it is held."""
    layers, hidden, inter = 16, 64, 160
    a = model_tensors(layers, seed=1, hidden=hidden, inter=inter)
    b = {k: v + 0.01 * torch.randn_like(v) for k, v in a.items()}
    a_dir, b_dir = write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)
    targets = sum(v.numel() * 4 for k, v in a.items() if "proj" in k)
    largest = inter * hidden * 4
    del a, b

    with LiveBytes() as live:
        result = analyze.analyze_pair(a_dir, b_dir, progress=False)
    assert len(result["entries"]) == 7 * layers
    assert live.peak < 8 * largest and live.peak < targets / 8, (live.peak, largest, targets)

    side = analyze.open_side(a_dir)  # safetensors' tensors are views of the memory-mapped file: copies count
    with LiveBytes() as live:
        held = [t.clone() for _, t in side.tensors([n for n in side.shapes if "proj" in n])]
    assert live.peak >= targets, (live.peak, targets)
    del held
