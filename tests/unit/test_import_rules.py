"""The direction of imports (DESIGN.md), checked by parsing every module of relora_ds/ with ast.

Imports inside functions count too (a lazy `import deepspeed` in the wrong module is still a
dependency). A module pattern ends in ".*" for "the package and everything under it".
"""

import ast
import os

import pytest

from tests.helpers import ROOT

PACKAGE = "relora_ds"


# imported name (and its submodules) → the only modules that may import it
ONLY_IN = {
    "deepspeed": ("relora_ds.engine.*", "relora_ds.cli", "relora_ds.train", "relora_ds.__main__"),
    "transformers": ("relora_ds.model.*", "relora_ds.data.*"),
    "wandb": ("relora_ds.metrics",),
    "tensorboard": ("relora_ds.metrics",),
    "tensorboardX": ("relora_ds.metrics",),
    "torch.utils.tensorboard": ("relora_ds.metrics",),
    "triton": ("relora_ds.kernels.*",),
    # lower modules never import the loop or the command line
    "relora_ds.trainer": ("relora_ds.cli", "relora_ds.train", "relora_ds.__main__", "relora_ds.tools.*",
                          "relora_ds.config"),  # the config assembles the sections, the trainer's `train` among them
    "relora_ds.cli": ("relora_ds.train", "relora_ds.__main__"),
    "relora_ds.train": ("relora_ds.cli", "relora_ds.__main__"),
    # the shipped benchmark sits on top, like the trainer: only the command line reaches it
    "relora_ds.bench": ("relora_ds.bench.*", "relora_ds.cli"),
    # the tools (export, eval, analyze, compare) sit on top too: they may import one another and the rest of the
    # package, and only the command line imports them
    "relora_ds.tools": ("relora_ds.tools.*", "relora_ds.cli", "relora_ds.train"),
}

# module pattern → imported names it must never import
NEVER = {
    "relora_ds.*": ("tests", "benchmarks"),
    "relora_ds.relora.*": ("transformers", "deepspeed", "relora_ds.trainer", "relora_ds.cli", "relora_ds.engine",
                           "relora_ds.data", "relora_ds.model", "relora_ds.metrics", "relora_ds.config"),
    "relora_ds.kernels.*": ("relora_ds",),  # nothing of relora_ds (its own package excepted, below)
    # a method says what happens to the model; the loop, data and logs are the trainer's
    "relora_ds.methods.*": ("relora_ds.trainer", "relora_ds.cli", "relora_ds.data", "relora_ds.metrics",
                            "relora_ds.tools", "relora_ds.bench", "relora_ds.config", "relora_ds.callbacks"),
    # the loop and its callbacks see the TrainEngine, never DeepSpeed, a restart layout or the restart itself
    "relora_ds.trainer": ("deepspeed", "relora_ds.engine.zero", "relora_ds.engine.restart",
                          "relora_ds.engine.zero_checkpoint"),
    "relora_ds.callbacks.*": ("deepspeed", "relora_ds.engine", "relora_ds.methods", "relora_ds.trainer",
                              "relora_ds.config"),
    # below the config: the owners of its sections and vocabularies never import it back
    "relora_ds.model.*": ("relora_ds.config",),
    "relora_ds.engine.*": ("relora_ds.config",),
    "relora_ds.data.*": ("relora_ds.config",),
    "relora_ds.schedule": ("relora_ds.config",),
    "relora_ds.metrics": ("relora_ds.config",),
}
# a method's hooks are callbacks: the base class is theirs to import
NEVER_EXCEPT = {"relora_ds.kernels.*": ("relora_ds.kernels",), "relora_ds.methods.*": ("relora_ds.callbacks.base",)}

# imported name → modules where it may only be imported inside a function (importing them stays cheap)
LAZY_ONLY = {
    "triton": ("relora_ds.kernels",),
    "wandb": ("relora_ds.*",),
    "tensorboard": ("relora_ds.*",),
    "torch.utils.tensorboard": ("relora_ds.*",),
}


def matches(module: str, pattern: str) -> bool:
    """`pattern` is a dotted name (that module only) or `prefix.*` (prefix and everything under it)."""
    if pattern.endswith(".*"):
        prefix = pattern[:-2]
        return module == prefix or module.startswith(prefix + ".")
    return module == pattern


def is_under(name: str, target: str) -> bool:
    """Whether the imported dotted `name` is `target` or inside it."""
    return name == target or name.startswith(target + ".")


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(absolute imported name, line, lazy) for every import in `source`; lazy = inside a function.

    `from x import y` yields both x and x.y (y may be a submodule); relative imports are resolved
    against `module`'s package.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1])
                    origin = f"{base}.{child.module}" if child.module else base
                else:
                    origin = child.module
                found.append((origin, child.lineno, lazy))
                found.extend((f"{origin}.{alias.name}", child.lineno, lazy) for alias in child.names
                             if alias.name != "*")
            visit(child, child_lazy)

    visit(tree, False)
    return found


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken rule, one line each, for {module name: (source, is_package)}."""
    problems = []
    for module, (source, is_package) in sorted(modules.items()):
        for name, line, lazy in imports_of(source, module, is_package):
            where = f"{module}:{line} imports {name}"
            for target, allowed in ONLY_IN.items():
                if is_under(name, target) and not any(matches(module, p) for p in allowed):
                    problems.append(f"{where}: {target} only in {', '.join(allowed)}")
            for pattern, forbidden in NEVER.items():
                if not matches(module, pattern):
                    continue
                excepted = NEVER_EXCEPT.get(pattern, ())
                for target in forbidden:
                    if is_under(name, target) and not any(is_under(name, e) for e in excepted):
                        problems.append(f"{where}: {pattern} never imports {target}")
            for target, patterns in LAZY_ONLY.items():
                if is_under(name, target) and not lazy and any(matches(module, p) for p in patterns):
                    problems.append(f"{where}: {target} must be imported inside a function here")
    return problems


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    root = os.path.join(ROOT, PACKAGE)
    for directory, _, files in os.walk(root):
        for filename in files:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            with open(path, encoding="utf-8") as f:
                sources[".".join(parts)] = (f.read(), is_package)
    return sources


def test_package_follows_the_import_rules():
    sources = package_sources()
    assert {"relora_ds", "relora_ds.relora.layer", "relora_ds.model.build"} <= set(sources)
    problems = violations(sources)
    assert not problems, "\n".join(problems)


def import_graph(modules: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the modules of relora_ds it imports (lazily or not)}. An import of a name inside a module counts as
    one of that module; a module's import of its own package (`from relora_ds.kernels import triton_fused` in
    relora_ds.kernels.autograd: the package is already loaded) and of the top-level package do not count."""
    def owner(name):
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph = {m: set() for m in modules}
    for module, (source, is_package) in modules.items():
        for name, _, _ in imports_of(source, module, is_package):
            target = owner(name)
            if target not in (None, module, PACKAGE) and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: each set of modules that reach one another (Tarjan's strongly connected
    components of more than one module), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_imports_point_one_way():
    """No import cycle among relora_ds's modules, lazy imports included (DESIGN.md: imports point one way)."""
    assert cycles(import_graph(package_sources())) == []


def test_cycle_finder_finds_a_planted_cycle():
    planted = {"relora_ds.a": ("def f():\n    from relora_ds.b import x\n", False),
               "relora_ds.b": ("from relora_ds import c\n", False),
               "relora_ds.c": ("import relora_ds.a\n", False),
               "relora_ds.d": ("from relora_ds.a import f\n", False)}
    assert cycles(import_graph(planted)) == [["relora_ds.a", "relora_ds.b", "relora_ds.c"]]


def test_imports_of_resolves_relative_and_nested_imports():
    source = (
        "import torch\n"
        "from . import functional\n"
        "from ..kernels import fused as f\n"
        "def go():\n"
        "    from relora_ds.engine import restart\n"
        "class K:\n"
        "    def m(self):\n"
        "        import deepspeed.ops\n"
    )
    found = imports_of(source, "relora_ds.relora.layer")
    assert ("torch", 1, False) in found
    assert ("relora_ds.relora.functional", 2, False) in found
    assert ("relora_ds.kernels.fused", 3, False) in found
    assert ("relora_ds.engine.restart", 5, True) in found
    assert ("deepspeed.ops", 8, True) in found
    assert ("relora_ds.relora.reset", 1, False) in imports_of("from .reset import x", "relora_ds.relora", True)


@pytest.mark.parametrize("module, source, is_package, expected", [
    ("relora_ds.relora.bad", "def f():\n    import transformers\n", False, "never imports transformers"),
    ("relora_ds.relora.bad", "from relora_ds.engine.restart import relora_restart\n", False,
     "never imports relora_ds.engine"),
    ("relora_ds.model.build", "import deepspeed\n", False, "deepspeed only in"),
    ("relora_ds.engine.restart", "from transformers import LlamaConfig\n", False, "transformers only in"),
    ("relora_ds.schedule", "def f():\n    import wandb\n", False, "wandb only in relora_ds.metrics"),
    ("relora_ds.metrics", "import wandb\n", False, "wandb must be imported inside a function"),
    ("relora_ds.kernels.fused", "from relora_ds.relora import functional\n", False, "never imports relora_ds"),
    ("relora_ds.kernels", "import triton\n", True, "triton must be imported inside a function"),
    ("relora_ds.relora.layer", "import triton\n", False, "triton only in relora_ds.kernels"),
    ("relora_ds.engine.restart", "from ..trainer import TrainState\n", False, "relora_ds.trainer only in"),
    ("relora_ds.data.loader", "from relora_ds import cli\n", False, "relora_ds.cli only in"),
    ("relora_ds.model.build", "from tests.helpers.tiny import tiny_model\n", False, "never imports tests"),
    ("relora_ds.trainer", "import benchmarks.kernels\n", False, "never imports benchmarks"),
    ("relora_ds.trainer", "def f():\n    import deepspeed\n", False, "deepspeed only in"),
    ("relora_ds.trainer", "from relora_ds.engine.zero import Layout\n", False, "never imports relora_ds.engine.zero"),
    ("relora_ds.callbacks.memory", "from relora_ds.engine import checkpoint\n", False,
     "never imports relora_ds.engine"),
    ("relora_ds.methods.galore", "from relora_ds.config import RunConfig\n", False, "never imports relora_ds.config"),
    ("relora_ds.methods.lora", "from relora_ds.callbacks.memory import MemoryEvents\n", False,
     "never imports relora_ds.callbacks"),
    ("relora_ds.relora.wrap", "from relora_ds.config import FAMILIES\n", False, "never imports relora_ds.config"),
    ("relora_ds.schedule", "from relora_ds import config\n", False, "never imports relora_ds.config"),
    ("relora_ds.trainer", "def f():\n    from relora_ds.tools.export import export\n", False,
     "relora_ds.tools only in"),
    ("relora_ds.engine.checkpoint", "from relora_ds.tools import analyze\n", False, "relora_ds.tools only in"),
    ("relora_ds.methods.relora", "import relora_ds.tools.compare\n", False, "never imports relora_ds.tools"),
])
def test_checker_catches_planted_violations(module, source, is_package, expected):
    problems = violations({module: (source, is_package)})
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(module + ":") for p in problems)


def test_checker_accepts_allowed_imports():
    allowed = {
        "relora_ds.engine.restart": ("import deepspeed\nfrom relora_ds.relora.reset import prune_\n", False),
        "relora_ds.trainer": ("from relora_ds.engine.train_module import start_engine\n", False),
        "relora_ds.methods.lora": ("from relora_ds.callbacks.base import Callback\nfrom relora_ds.engine import restart\n",
                                   False),
        "relora_ds.config": ("from relora_ds.methods import METHODS\nfrom relora_ds.schedule import SCHEDULE_KINDS\n", False),
        "relora_ds.cli": ("def main():\n    from relora_ds.trainer import train\n", False),
        "relora_ds.model.build": ("from transformers import LlamaConfig\nfrom relora_ds.relora import wrap\n", False),
        "relora_ds.data.tokenize": ("def f():\n    from transformers import AutoTokenizer\n", False),
        "relora_ds.metrics": ("def f():\n    import wandb\n", False),
        "relora_ds.kernels": ("from relora_ds.kernels import reference\ndef f():\n    import triton\n", True),
        "relora_ds.kernels.fused": ("import triton\nimport triton.language as tl\n", False),
        "relora_ds.relora.layer": ("from relora_ds.kernels import fused_relora_linear\n", False),
        "relora_ds.tools.compare": ("from relora_ds import trainer\nfrom relora_ds.tools import analyze\n", False),
        "relora_ds.tools.analyze": ("from relora_ds.engine import checkpoint\nfrom relora_ds.tools.export import x\n",
                                    False),
        "relora_ds.train": ("def f():\n    from relora_ds.tools import eval\n", False),
    }
    assert violations(allowed) == []
