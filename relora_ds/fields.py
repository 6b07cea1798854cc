"""How a config section's field is declared, by whoever owns the section (config.py assembles the sections)."""

import copy
from dataclasses import field


def setting(default, help: str, choices: tuple | None = None):
    """A dataclass field with its help text (and allowed values, checked by config.validate) in the metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
