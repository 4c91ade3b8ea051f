"""The package's layout (issue 25): subpackages by concern, imports only go down (no circle, nothing below imports
what sits above it), no module over 450 lines, the trainer a loop of at most 250; and `_target_` paths of the
flat layout before 0.2 still work, with a deprecation warning."""
import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lcm_exp

PACKAGE = Path(lcm_exp.__file__).parent
# Lowest first. A module may import its own layer's modules (no circle among them) and any lower layer's.
LAYERS = [
    ["lcm_exp", "lcm_exp.quiet", "lcm_exp.config"],
    ["lcm_exp.distill", "lcm_exp.data"],
    ["lcm_exp.teachers", "lcm_exp.students"],
    ["lcm_exp.train", "lcm_exp.tracking"],
    ["lcm_exp.evaluation"],
    ["lcm_exp.export"],
    ["lcm_exp.runner"],
    ["lcm_exp.bench", "lcm_exp.cli", "lcm_exp.__main__", "lcm_exp.launch"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every lcm_exp module `path` imports, at the top or inside a function (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from . import checkpoint`: a module of that package
                sub = f"{module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "lcm_exp" or m.startswith("lcm_exp.")}


def layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, names in enumerate(LAYERS) if best in names)


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer_and_imports_go_down():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in GRAPH.items() for d in deps
              if layer(d) > layer(m)]
    assert upward == []


def test_no_import_circles():
    def visit(node, path, seen):
        for dep in GRAPH.get(node, ()):
            dep = dep if dep in GRAPH else dep.rpartition(".")[0]  # (`from pkg import name` of a package)
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep not in seen:
                seen.add(dep)
                if cycle := visit(dep, path + [dep], seen):
                    return cycle
        return None

    for module in GRAPH:
        cycle = visit(module, [module], {module})
        assert cycle is None or cycle == [module, module], " -> ".join(cycle)


def test_modules_stay_short_and_subpackages_say_what_they_hold():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
    assert len((PACKAGE / "train" / "trainer.py").read_text().splitlines()) <= 250
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 100, f"{init.parent.name}/__init__.py says what it holds"


def test_old_target_paths_work_with_a_deprecation_warning():
    from lcm_exp.config import validate
    from lcm_exp.config.options import MOVED, current_target
    from lcm_exp.tracking.applicability import option_name

    cfg = OmegaConf.create({"loss": {"_target_": "lcm_exp.losses.huber", "_partial_": True, "huber_c": 0.001}})
    with pytest.warns(DeprecationWarning, match="lcm_exp.losses.huber is deprecated"):
        validate(cfg)
    assert cfg.loss._target_ == "lcm_exp.distill.losses.huber"
    # every old module still names a module that exists, and a run logged before the move keeps its option name
    for new in MOVED.values():
        module = PACKAGE.parent / new.replace(".", "/")
        assert module.with_suffix(".py").exists() or (module / "__init__.py").exists(), new
    assert option_name("loss", "lcm_exp.losses.l2") == "l2"
    assert current_target("my_module.MyLoss") == "my_module.MyLoss"
