"""The package's layers: every import goes down (or sideways within a layer), never up, and
no set of modules imports itself in a circle. Read off the source with `ast`, so imports
inside functions count too (except those of third-party packages, which may be optional)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The layer order, lowest first: a module may import from its own layer and those before
# it. Each entry names package prefixes; a module belongs to the layer of its longest
# matching prefix. ddim_fast itself (its __init__ and __main__) is the facade on top.
LAYERS = [
    ("base", ["ddim_fast.version", "ddim_fast.core"]),
    ("kernels", ["ddim_fast.kernels"]),
    ("ops", ["ddim_fast.ops"]),
    ("models", ["ddim_fast.models"]),
    ("sampling", ["ddim_fast.sampling"]),
    ("apps", ["ddim_fast.apps"]),
    ("cli", ["ddim_fast.cli"]),
    ("facade", ["ddim_fast"]),
]
MAX_LINES = 450


def _source_files():
    """{module name: path} of ddim_fast/."""
    found = {}
    for folder, package in (("ddim_fast", "ddim_fast"),):
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for f in filenames:
                if f.endswith(".py"):
                    name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                    found[name] = os.path.join(dirpath, f)
    return found


MODULES = _source_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _resolve(module: str, node) -> list:
    """The modules of ours that an import statement in `module` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "ddim_fast"]
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "ddim_fast":
        return []
    # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def _imports(module: str) -> set:
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=MODULES[module])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(module, node):
                if target != "ddim_fast._C":  # the native extension: no Python source
                    out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def test_the_parser_sees_the_imports_it_should():
    """A check of the checker: known edges of the package are found."""
    assert "ddim_fast.core.schedule" in GRAPH["ddim_fast.sampling.fast"]  # from ..core.schedule import Schedule
    assert "ddim_fast.ops" in GRAPH["ddim_fast.models.fuse"]  # from .. import ops
    assert "ddim_fast.kernels.ddim_step" in GRAPH["ddim_fast.ops.dispatch"]  # inside a function
    assert "ddim_fast.sampling.graph" in GRAPH["ddim_fast.sampling.fast"]
    assert not any(t.split(".")[0] != "ddim_fast" for deps in GRAPH.values() for t in deps)


def test_every_module_is_in_a_layer_and_imports_only_what_exists():
    assert len(MODULES) > 40
    for module, deps in GRAPH.items():
        assert _layer(module) is not None, f"{module} is in no layer: add its package to LAYERS"
        for target in deps:
            assert target in MODULES, f"{module} imports {target}, which is not a module of ddim_fast"


def test_no_import_goes_up_a_layer():
    up = []
    for module, deps in sorted(GRAPH.items()):
        for target in sorted(deps):
            if _layer(target) > _layer(module):
                up.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_the_line_limit(module):
    with open(MODULES[module], encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (at most {MAX_LINES}): split it by responsibility"


def test_every_package_says_what_its_layer_is_for():
    for module, path in MODULES.items():
        if path.endswith("__init__.py") and module.count(".") == 1:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
            assert doc and "import" in doc, f"{path}: the docstring should say what the layer is for and what it may import"


def test_every_sub_package_of_apps_says_what_its_concern_is():
    for module, path in MODULES.items():
        if path.endswith("__init__.py") and module.startswith("ddim_fast.apps."):
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
            assert doc, f"{path}: a one-line docstring should say what this concern is"


def _private_names_of(path: str, class_name: str) -> set:
    """The private names of a class: its `_` methods and attributes, and what its methods set
    on self (`self._x = ...`)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in cls.body:
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _python_files_outside_sampling() -> dict:
    """{path: source} of ddim_fast/ but sampling/, and of benchmarks/."""
    paths = [p for m, p in MODULES.items() if not m.startswith("ddim_fast.sampling")]
    benchmarks = os.path.join(ROOT, "benchmarks")
    paths += [os.path.join(benchmarks, f) for f in sorted(os.listdir(benchmarks)) if f.endswith(".py")]
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out[path] = f.read()
    return out


def test_code_outside_sampling_reads_samplers_through_their_public_names():
    """Pipelines, the command line and the benchmarks use FastSampler's and CapturedLoop's
    public accessors (plan, spec, prepared_model, sibling, step_loop, one_step, ...), not
    their private attributes, which sampling/ may change at will. (Tests may look inside.)"""
    private = _private_names_of(os.path.join(ROOT, "ddim_fast", "sampling", "fast.py"), "FastSampler")
    private |= _private_names_of(os.path.join(ROOT, "ddim_fast", "sampling", "graph.py"), "CapturedLoop")
    assert {"_plan", "_preparation", "_layout", "_graphs"} <= private  # a check of the checker
    reads = []
    for path, source in _python_files_outside_sampling().items():
        for node in ast.walk(ast.parse(source)):
            # x._name with x anything but self: self._name is the module's own class's
            own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if isinstance(node, ast.Attribute) and node.attr in private and not own:
                reads.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: .{node.attr}")
    assert not reads, "private sampler attributes read outside ddim_fast/sampling/:\n" + "\n".join(reads)
