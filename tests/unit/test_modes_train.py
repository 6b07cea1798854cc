"""Each mode (full / lora / relora) trains a tiny LLaMA with a plain torch AdamW loop on byte tokens.

ReLoRA here is the whole single-process algorithm: full-rank warm start, then wrap; a merge, a
magnitude reset of the adapters' moments and a jagged LR re-warm-up every CYCLE steps. The DeepSpeed
version of the same loop lives in trainer.py; this test pins the algorithm without it.

"relora" prunes with `pair_moments=True`; "relora_paper" prunes the two moments independently, as the
paper does, and shows the loss spike that leaves behind (first moments without a second moment).
"""

import pytest
import torch

from relora_ds.methods.relora import restart_action
from relora_ds.relora.reset import reset_optimizer_state
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import adapter_parameter_names, merge_and_reinit, wrap
from relora_ds.schedule import lr_multiplier
from tests.helpers.tiny import fixed_batch, lm_loss, logits, tiny_model, token_batches

pytestmark = pytest.mark.slow  # 4 tiny training runs of 240 steps (~20 s): not in `make test-fast`

TOTAL = 240
WARMUP = 20
WARM_START = 80      # full-rank steps before wrapping (relora); lora wraps at step 0
CYCLE = 40           # reset_every = merge_every
RESTART_WARMUP = 10
RANK, ALPHA = 16, 32
PEAK_LR = {"full": 3e-3, "lora": 6e-3, "relora": 6e-3}  # ReLoRA wants a higher LR (paper, Appendix A)
SEED = 0


def fresh_optimizer(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)


def run(mode: str) -> dict:
    """Train TOTAL steps in `mode`; return losses, LRs and what happened at each restart."""
    pair_moments = mode == "relora"
    mode = "relora" if mode == "relora_paper" else mode
    torch.manual_seed(SEED)
    model = tiny_model(seed=SEED)
    offset = {"full": 0, "lora": 0, "relora": WARM_START}[mode]
    schedule = dict(total_steps=TOTAL, warmup_steps=WARMUP, restart_warmup_steps=RESTART_WARMUP,
                    cycle_length=CYCLE if mode == "relora" else None, restart_offset=offset, min_lr_ratio=0.1)
    if mode == "lora":
        wrap(model, target_modules=target_modules_of(model), rank=RANK, alpha=ALPHA, seed=SEED)
    optimizer = fresh_optimizer(model)
    batches = token_batches(8, 64, seed=SEED)
    probe = fixed_batch(4, 64, seed=123)
    record = dict(losses=[], lrs=[], wrapped_at=None, merges=[], zeroed=[], merge_output_change=[])
    restart_index = 0
    for step in range(TOTAL):
        if mode == "relora" and step == WARM_START:  # warm start over: adapters in, fresh optimizer
            wrap(model, target_modules=target_modules_of(model), rank=RANK, alpha=ALPHA, seed=SEED)
            optimizer = fresh_optimizer(model)
            record["wrapped_at"] = step
        if mode == "relora" and step > WARM_START and (step - WARM_START) % CYCLE == 0:
            before = logits(model, probe)
            restart_index += 1
            merge_and_reinit(model, seed=SEED, restart_index=restart_index)
            after = logits(model, probe)
            params = dict(model.named_parameters())
            adapters = {name: params[name] for name in adapter_parameter_names(model)}
            record["zeroed"].append(reset_optimizer_state(optimizer, adapters, method="magnitude", ratio=0.99,
                                                         pair_moments=pair_moments))
            record["merges"].append(step)
            record["merge_output_change"].append(float((after - before).norm() / before.norm()))
        lr = PEAK_LR[mode] * lr_multiplier(step, **schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["losses"].append(loss.item())
        record["lrs"].append(lr)
    return record


@pytest.fixture(scope="module")
def runs() -> dict:
    # One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads made each step ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {mode: run(mode) for mode in ("full", "lora", "relora", "relora_paper")}
    finally:
        torch.set_num_threads(threads)


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("mode", ["full", "lora", "relora", "relora_paper"])
def test_loss_decreases_clearly(runs, mode):
    losses = runs[mode]["losses"]
    first, last = mean(losses[:10]), mean(losses[-20:])
    assert first > 5.0  # ~ln 256 at the start: bytes are uniform to a fresh model
    assert last < 0.6 * first, (mode, first, last)
    assert all(loss == loss and loss < first + 0.5 for loss in losses), mode  # no NaN, no blow-up
    if mode != "relora_paper":
        assert last < 0.45, (mode, last)  # measured: full 0.18, lora 0.15, relora 0.26


@pytest.mark.parametrize("mode", ["relora", "relora_paper"])
def test_relora_restarts_at_the_configured_steps(runs, mode):
    record = runs[mode]
    assert record["wrapped_at"] == WARM_START
    assert record["merges"] == [120, 160, 200] == [t for t in range(TOTAL)
                                                   if restart_action(t, WARM_START, CYCLE, CYCLE)[0]]
    for step in [80, 120, 160, 200]:  # the switch and the restarts: the LR drops to 0 and re-warms over RESTART_WARMUP
        assert record["lrs"][step] == 0.0
        assert 0 < record["lrs"][step + 1] < record["lrs"][step + RESTART_WARMUP]
    assert record["lrs"][WARM_START - 1] > 0
    for fraction in record["zeroed"]:  # pairing zeroes a few more first moments
        assert 0.985 <= fraction <= (0.995 if mode == "relora" else 0.99)
    for change in record["merge_output_change"]:
        assert change < 1e-5  # the merge itself does not change the model


def test_relora_learns_through_restarts(runs):
    """After the switch the adapters carry the learning: the loss keeps falling across cycles, and no
    restart costs more than a blip."""
    losses = runs["relora"]["losses"]
    at_switch = mean(losses[WARM_START - 10:WARM_START])
    assert mean(losses[-20:]) < at_switch - 0.5, (at_switch, mean(losses[-20:]))
    for step in runs["relora"]["merges"]:
        before = mean(losses[step - 5:step])
        assert max(losses[step:step + RESTART_WARMUP + 5]) < before + 0.3, step


def test_independent_moment_pruning_spikes_after_a_restart(runs):
    """The paper's independent pruning keeps first moments whose second moment is gone; A's gradient is
    zero just after a restart (B = 0), so Adam steps those entries by ~lr·m/eps and the loss jumps.
    If this starts failing, the spike is gone: revisit `pair_moments` (reset.py)."""
    paper, paired = runs["relora_paper"]["losses"], runs["relora"]["losses"]
    first_merge = runs["relora_paper"]["merges"][0]
    before = mean(paper[first_merge - 5:first_merge])
    assert max(paper[first_merge:first_merge + RESTART_WARMUP]) > 2 * before
    assert mean(paper[-20:]) > 2 * mean(paired[-20:])
