"""Training methods: one file each in this package, holding the Method subclass whose `name` is the file's name
(methods/base.py: the interface). METHODS is made of those files, imported once here: the only list of method names;
adding a method is adding its file."""

import importlib
import inspect
import pkgutil

from relora_ds.methods.base import Method

NOT_METHODS = ("base", "hooks")  # the interface and the methods' callbacks


def _discover() -> dict[str, type[Method]]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in NOT_METHODS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        [cls] = [c for _, c in inspect.getmembers(module, inspect.isclass)
                 if issubclass(c, Method) and c.__module__ == module.__name__ and c.name == info.name] or [None]
        if cls is None:
            raise ImportError(f"relora_ds/methods/{info.name}.py: defines no Method subclass named {info.name!r}")
        found[info.name] = cls
    return found


METHODS: dict[str, type[Method]] = _discover()


def from_config(cfg) -> Method:
    """The run's method (`method:`), holding its own resolved copy of the config (RunConfig.resolved:
    relora.merge_every filled in); a one-line ValueError for an unknown method or an impossible LR schedule."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    return METHODS[cfg.method](cfg.resolved())
