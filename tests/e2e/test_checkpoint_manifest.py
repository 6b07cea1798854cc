"""checkpoint.save with a real DeepSpeed engine on 2 gloo ranks (ZeRO-2) writes MANIFEST.json over every rank's
files; a later save of the same step keeps an intact tag, and rewrites one whose files were damaged after moving
the damaged one to checkpoints/damaged/ (never deleted)."""

import json
import os

from relora_ds.engine import checkpoint, ds_config as dsc
from tests.helpers.spawn import run_on_ranks
from tests.helpers.tiny import tiny_model


def save_damage_save(rank, world_size, ckpt_dir):
    from relora_ds import dist
    from relora_ds.engine import runtime

    config = dsc.reconcile(dsc.load_ds_config("ds_configs/cpu_zero2.json"), lr=1e-3, world_size=world_size)
    engine = runtime.make_engine(tiny_model(seed=0), config)
    state = {"step": 1, "wrapped": False}
    tag_dir = checkpoint.save(engine, ckpt_dir, step=1, state=state, keep_last=2)
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    written = os.stat(model_file).st_mtime_ns
    checkpoint.save(engine, ckpt_dir, step=1, state=state, keep_last=2)  # intact and the same: kept
    kept = os.stat(model_file).st_mtime_ns == written
    dist.barrier()
    if rank == 0:
        with open(model_file, "r+b") as f:
            f.truncate(100)
    dist.barrier()
    checkpoint.save(engine, ckpt_dir, step=1, state=state, keep_last=2)  # damaged: set aside, written again
    engine.destroy()
    return tag_dir, kept


def test_save_writes_a_manifest_and_rewrites_a_damaged_tag(tmp_path):
    ckpt_dir = str(tmp_path / "checkpoints")
    results = run_on_ranks(save_damage_save, world_size=2, args=(ckpt_dir,), timeout=300)
    tag_dir = results[0][0]
    assert [kept for _, kept in results] == [True, True]

    with open(os.path.join(tag_dir, checkpoint.MANIFEST)) as f:
        files = json.load(f)["files"]
    on_disk = {os.path.relpath(os.path.join(root, name), tag_dir) for root, _, names in os.walk(tag_dir)
               for name in names}
    assert set(files) == on_disk - {checkpoint.MANIFEST, checkpoint.COMPLETE}
    for rank in (0, 1):
        assert f"rank_{rank:05d}_rng.pt" in files
        assert any(name.startswith(f"zero_pp_rank_{rank}_") and name.endswith("optim_states.pt") for name in files)
    checkpoint.verify(tag_dir)
    assert checkpoint.find_checkpoint(str(tmp_path)) == tag_dir
    aside = os.path.join(ckpt_dir, checkpoint.DAMAGED, checkpoint.tag_for(1))
    assert os.path.getsize(os.path.join(aside, "mp_rank_00_model_states.pt")) == 100  # the damaged copy, kept
    assert sorted(os.listdir(aside)) == sorted(os.listdir(tag_dir))
    from relora_ds.engine.zero_checkpoint import lazy_fp32_state_dict

    assert "model.embed_tokens.weight" in lazy_fp32_state_dict(tag_dir)
