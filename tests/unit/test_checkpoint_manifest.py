"""MANIFEST.json of a checkpoint tag: written before COMPLETE with every file's size and CRC32; a resume skips
newer tags whose files no longer match it, an explicitly named tag that does not match is an error, and a
tag from before manifests is taken as it is. Tags are built by hand (no DeepSpeed): files, then the module's
mark_complete, as save() does."""

import json
import os
import zlib

import pytest
import torch

from relora_ds.engine import checkpoint

MODEL_FILE = "mp_rank_00_model_states.pt"


def fake_tag(run_dir, step: int, *, manifest: bool = True) -> str:
    tag_dir = os.path.join(run_dir, "checkpoints", checkpoint.tag_for(step))
    os.makedirs(os.path.join(tag_dir, "zero"))
    torch.save({"module": {"w": torch.full((4096,), float(step))}}, os.path.join(tag_dir, MODEL_FILE))
    with open(os.path.join(tag_dir, "zero", "shard.bin"), "wb") as f:
        f.write(os.urandom(1000))
    with open(os.path.join(tag_dir, checkpoint.STATE_FILE), "w") as f:
        json.dump({"step": step}, f)
    if manifest:
        checkpoint.mark_complete(tag_dir, step)
    else:  # written by a relora-ds from before MANIFEST.json
        with open(os.path.join(tag_dir, checkpoint.COMPLETE), "w") as f:
            f.write(f"{step}\n")
    return tag_dir


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_manifest_records_every_file_but_itself_and_complete(tmp_path):
    tag_dir = fake_tag(tmp_path, 2)
    with open(os.path.join(tag_dir, checkpoint.MANIFEST)) as f:
        files = json.load(f)["files"]
    assert sorted(files) == [MODEL_FILE, checkpoint.STATE_FILE, os.path.join("zero", "shard.bin")]
    for relative, entry in files.items():
        data = open(os.path.join(tag_dir, relative), "rb").read()
        assert entry == {"size": len(data), "crc32": zlib.crc32(data)}
    assert sorted(os.listdir(tag_dir)) == sorted([checkpoint.COMPLETE, checkpoint.MANIFEST, MODEL_FILE,
                                                  checkpoint.STATE_FILE, "zero"])  # no temporary files left
    checkpoint.verify(tag_dir)


def test_file_crc32_streams_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    data = os.urandom(10_000)
    path.write_bytes(data)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    assert checkpoint.file_crc32(str(path)) == zlib.crc32(data)


@pytest.mark.parametrize("damage, checksums_needed", [(truncate, False), (flip_a_byte, True)])
def test_resume_skips_damaged_newest_tag(tmp_path, capsys, damage, checksums_needed):
    older, newest = fake_tag(tmp_path, 2), fake_tag(tmp_path, 4)
    damage(os.path.join(newest, MODEL_FILE))
    capsys.readouterr()
    assert checkpoint.find_checkpoint(str(tmp_path)) == older
    assert checkpoint.find_checkpoint(os.path.join(tmp_path, "checkpoints")) == older
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2  # one line per find_checkpoint call
    assert warnings[0].startswith(f"warning: {os.path.join(newest, MODEL_FILE)}: ")
    assert "skipping checkpoint step_00000004" in warnings[0]
    # Sizes alone catch a truncation, not a same-size corruption.
    assert checkpoint.find_checkpoint(str(tmp_path), checksums=False) == (older if not checksums_needed else newest)


def test_explicit_damaged_tag_is_a_one_line_error(tmp_path):
    fake_tag(tmp_path, 2)
    newest = fake_tag(tmp_path, 4)
    size = os.path.getsize(os.path.join(newest, MODEL_FILE))
    truncate(os.path.join(newest, MODEL_FILE))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.find_checkpoint(newest)  # `relora-ds export runs/x/checkpoints/step_00000004`
    assert str(info.value) == (f"{os.path.join(newest, MODEL_FILE)}: {size // 2} bytes, MANIFEST.json records "
                               f"{size} (truncated or overwritten)")


def test_missing_file_is_named(tmp_path):
    tag_dir = fake_tag(tmp_path, 2)
    os.remove(os.path.join(tag_dir, "zero", "shard.bin"))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.verify(tag_dir, checksums=False)
    assert str(info.value) == f"{os.path.join(tag_dir, 'zero', 'shard.bin')}: missing (listed in MANIFEST.json)"


def test_same_size_corruption_names_the_file(tmp_path):
    tag_dir = fake_tag(tmp_path, 2)
    flip_a_byte(os.path.join(tag_dir, "zero", "shard.bin"))
    checkpoint.verify(tag_dir, checksums=False)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.verify(tag_dir)
    assert str(info.value) == f"{os.path.join(tag_dir, 'zero', 'shard.bin')}: CRC32 differs from MANIFEST.json " \
                              f"(corrupt file)"


def test_no_intact_tag_is_a_one_line_error(tmp_path, capsys):
    for step in (2, 4):
        truncate(os.path.join(fake_tag(tmp_path, step), MODEL_FILE))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.find_checkpoint(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{os.path.join(tmp_path, 'checkpoints')}: none of its 2 complete checkpoints is "
                              f"intact (the newest: {os.path.join(tmp_path, 'checkpoints', 'step_00000004')}")
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_tag_without_manifest_is_taken_as_before(tmp_path):
    fake_tag(tmp_path, 2)
    old_style = fake_tag(tmp_path, 4, manifest=False)
    truncate(os.path.join(old_style, MODEL_FILE))  # nothing to check it against
    assert checkpoint.find_checkpoint(str(tmp_path)) == old_style
    assert checkpoint.find_checkpoint(old_style) == old_style


def test_unreadable_manifest_is_one_line(tmp_path):
    tag_dir = fake_tag(tmp_path, 2)
    with open(os.path.join(tag_dir, checkpoint.MANIFEST), "w") as f:
        f.write("{\"files\": ")
    with pytest.raises(checkpoint.CheckpointError, match=r"MANIFEST.json: unreadable \(JSONDecodeError: [^\n]*\)$"):
        checkpoint.verify(tag_dir)


def test_reading_a_truncated_file_is_one_line(tmp_path):
    from relora_ds.engine.zero_checkpoint import lazy_fp32_state_dict

    tag_dir = fake_tag(tmp_path, 2, manifest=False)
    assert lazy_fp32_state_dict(tag_dir)["w"].load().shape == (4096,)
    truncate(os.path.join(tag_dir, MODEL_FILE))
    with pytest.raises(checkpoint.CheckpointError) as info:
        lazy_fp32_state_dict(tag_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{os.path.join(tag_dir, MODEL_FILE)}: cannot be read, truncated or corrupt? (")


def test_reference_checkpoint_is_read_from_the_marker(tmp_path):
    from relora_ds.engine import checkpoint as ck

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert ck.reference_checkpoint(str(run)) is None  # no marker: the run recorded none
    (run / "checkpoints" / ck.REFERENCE).write_text("step_00000004\n")
    with pytest.raises(ck.CheckpointError, match=r"reference: names step_00000004, which is not a complete checkpoint"):
        ck.reference_checkpoint(str(run))
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir()
    (tag / ck.COMPLETE).write_text("4\n")
    assert ck.reference_checkpoint(str(run)) == str(tag)
    assert ck.reference_checkpoint(str(run / "checkpoints")) == str(tag)


# --- damaged checkpoints are moved aside, never deleted ------------------------------------------------------

def _damaged(run_dir) -> list[str]:
    parent = os.path.join(run_dir, "checkpoints", checkpoint.DAMAGED)
    return sorted(os.listdir(parent)) if os.path.isdir(parent) else []


def test_resume_moves_a_damaged_tag_aside_and_names_it(tmp_path, capsys):
    older, newest = fake_tag(tmp_path, 2), fake_tag(tmp_path, 4)
    flip_a_byte(os.path.join(newest, MODEL_FILE))
    capsys.readouterr()
    assert checkpoint.find_resume_checkpoint(str(tmp_path)) == older
    [warning] = capsys.readouterr().err.splitlines()
    aside = os.path.join(tmp_path, "checkpoints", checkpoint.DAMAGED, "step_00000004")
    assert warning.startswith(f"warning: {os.path.join(newest, MODEL_FILE)}: CRC32 differs")
    assert f"checkpoint step_00000004 moved to {aside} (kept, never deleted)" in warning
    assert not os.path.exists(newest) and os.path.isfile(os.path.join(aside, MODEL_FILE))
    assert checkpoint.complete_tags(os.path.join(tmp_path, "checkpoints")) == ["step_00000002"]
    # A tool that only reads (export, analyze) skips it without moving anything.
    newest = fake_tag(tmp_path, 6)
    truncate(os.path.join(newest, MODEL_FILE))
    assert checkpoint.find_checkpoint(str(tmp_path)) == older and os.path.isdir(newest)


def test_auto_resume_with_every_tag_damaged_starts_fresh_and_keeps_them(tmp_path, capsys):
    from relora_ds.engine import run_dir
    from relora_ds.config import load_config

    run = str(tmp_path / "run")
    for step in (4, 8):
        truncate(os.path.join(fake_tag(run, step), MODEL_FILE))
    cfg = load_config(None, [f"train.output_dir={run}", "train.resume=auto"])
    assert run_dir.prepare_output_dir(cfg) is None  # a fresh start
    assert _damaged(run) == ["step_00000004", "step_00000008"]
    assert len([w for w in capsys.readouterr().err.splitlines() if "(kept, never deleted)" in w]) == 2
    # The fresh run saves and prunes (keep_last 1) its own tags: the damaged ones are not among them. When it
    # reaches a step whose tag was damaged and set aside before, the second copy goes beside the first.
    ckpt_dir = os.path.join(run, "checkpoints")
    for step in (4, 8):
        fake_tag(run, step)
        checkpoint._prune(ckpt_dir, keep_last=1, newest=checkpoint.tag_for(step))
    assert checkpoint.complete_tags(ckpt_dir) == ["step_00000008"]
    assert _damaged(run) == ["step_00000004", "step_00000008"]
    truncate(os.path.join(ckpt_dir, "step_00000008", MODEL_FILE))
    assert run_dir.prepare_output_dir(cfg) is None
    assert _damaged(run) == ["step_00000004", "step_00000008", "step_00000008.1"]
    # train.resume=true with nothing intact: the error says where they went.
    truncate(os.path.join(fake_tag(run, 12), MODEL_FILE))
    cfg.train.resume = True
    with pytest.raises(checkpoint.CheckpointError, match=r"none of its 1 complete checkpoints is intact, all moved "
                                                         r"to .*/checkpoints/damaged \(the newest: "):
        run_dir.prepare_output_dir(cfg)
    assert "step_00000012" in _damaged(run)


def test_pruning_moves_a_damaged_tag_aside_instead_of_deleting_it(tmp_path, capsys):
    ckpt_dir = os.path.join(tmp_path, "checkpoints")
    damaged, intact = fake_tag(tmp_path, 2), fake_tag(tmp_path, 4)
    os.remove(os.path.join(damaged, "zero", "shard.bin"))
    fake_tag(tmp_path, 6)
    checkpoint._prune(ckpt_dir, keep_last=1, newest="step_00000006")
    assert checkpoint.complete_tags(ckpt_dir) == ["step_00000006"]
    assert not os.path.exists(intact)  # an intact old tag is pruned as asked
    assert _damaged(tmp_path) == ["step_00000002"]
    assert "step_00000002 moved to" in capsys.readouterr().err
