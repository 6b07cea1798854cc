"""data.skip: pass over the data of some steps without training on it (a loss spike's batches), by step.

    data:
      skip: ["1200:200"]   # after step 1200, the data of the next 200 steps is passed over: step 1201 trains on
                           # what step 1401 would have, and every later step on what it would have 200 steps later

The usual way out of a loss spike that comes back on every resume (the same batches, in the same order): resume from a
checkpoint before it and pass over the batches around it. The data position moves on (map-style data and mixtures
without reading; a stream reads and drops them), the step count does not, and nothing is trained on the batches passed
over. The steps where it was done are part of the data position (DistributedBatches.skipped), so a resume from a
checkpoint written after it does not do it again, and one from before does it at the same step.
"""


def parse(entries: list[str]) -> dict[int, int]:
    """{step: steps of data to pass over after it} of data.skip (checked by skip_errors)."""
    return {int(step): int(count) for step, count in (entry.split(":") for entry in entries)}


def skip_errors(entries: list[str], total_steps: int) -> list[str]:
    """Every problem with data.skip, one line each (config.validate)."""
    errors, seen = [], set()
    for entry in entries:
        parts = entry.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            errors.append(f"data.skip: {entry!r} is not STEP:STEPS (after step STEP, pass over the data of STEPS "
                          f"steps), e.g. '1200:200'")
            continue
        step, count = int(parts[0]), int(parts[1])
        if count < 1:
            errors.append(f"data.skip: {entry!r} passes over no steps; STEPS must be >= 1")
        if step >= total_steps:
            errors.append(f"data.skip: {entry!r} is at or after train.total_steps ({total_steps})")
        if step in seen:
            errors.append(f"data.skip: step {step} is named twice; give it one entry with the steps added up")
        seen.add(step)
    return errors
