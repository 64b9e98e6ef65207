"""The package layout holds: no import circle, and imports run one way through the stages
(core <- ingest <- augment <- encode <- nel_model <- dim_mel; fixtures beside, imported by no stage), and inside
nel_model through its rooms (the model <- model support <- evaluation <- training <- re-ranking <- inference
<- reporting <- orchestration and entry points).

Every ``import`` statement counts, also those inside functions, since a lazy import is still a dependency; and so
does a string that names a project module (``"nel_model.rerank.llm"`` in a registry, an ``importlib`` call, a
command table): a module reached by name is a dependency all the same."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_process", "nel_model", "dim_mel")
# A module may import modules of its own layer or an earlier one; a layer is a tuple of module prefixes.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("data_process.core",), ("data_process.ingest",), ("data_process.augment",), ("data_process.encode",),
    ("nel_model.nel", "nel_model.mimic", "nel_model.losses"),       # the model: torch only
    ("nel_model.data", "nel_model.distributed", "nel_model.runs", "nel_model.encoding", "nel_model.linking",
     "nel_model.config", "nel_model.loaded_run"),                   # the model's support
    ("nel_model.evaluation", "nel_model.index"),
    ("nel_model.training",),
    ("nel_model.rerank",),                                          # second stages: never the linking commands
    ("nel_model.inference",),                                       # retrieve, link, predict (over the re-rankers)
    ("nel_model.reporting",),
    ("nel_model.ablations", "nel_model.train", "nel_model"),        # orchestration and entry points
    ("dim_mel",),
)
MODEL_LAYER = LAYERS.index(("nel_model.nel", "nel_model.mimic", "nel_model.losses"))
FIXTURES = "data_process.fixtures"


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def named_module(text: str, known: set[str]) -> str | None:
    """The project module a string names: the whole string, or its head before ``:`` or a last ``.attribute``
    (``"nel_model.rerank.llm"``, ``"nel_model.rerank.llm:load_reranker"``, ``"nel_model.rerank.llm.main"``)."""
    text = text.strip()
    for cand in (text, text.split(":", 1)[0], text.rsplit(".", 1)[0]):
        if cand in known and "." in cand:
            return cand
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module),
    or names in a string (:func:`named_module`)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            target = named_module(node.value, known)
            if target is not None and target != name:
                found.add(target)
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def layer(name: str) -> int | None:
    """The layer of a module: the one whose longest prefix matches (``nel_model.nel`` before ``nel_model``)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_graph_sees_the_packages():
    g = graph()
    # a check that reads nothing cannot fail: make sure the walk found the modules and their imports
    assert "data_process.core.records" in g and "nel_model.train" in g and "dim_mel.cli" in g
    assert "data_process.core.durable_io" in g["data_process.core.records"]
    assert "nel_model.training.batches" in g["nel_model.training.loop"]
    assert "nel_model.inference.linker" in g["dim_mel.cli"]           # the command table names modules in strings


def test_a_module_named_in_a_string_is_an_import(tmp_path):
    known = {"nel_model.rerank.llm", "nel_model.inference.linker", "nel_model"}
    mod = tmp_path / "registry.py"
    mod.write_text('import importlib\nKINDS = {"llm": "nel_model.rerank.llm"}\n'
                   'f = importlib.import_module("nel_model.inference.linker")\n'
                   'G = "nel_model.rerank.llm:load_reranker"\nDOC = "see nel_model.rerank.llm for details"\n'
                   'PKG = "nel_model"\n')
    assert imports_of("x.registry", mod, known) == {"nel_model.rerank.llm", "nel_model.inference.linker"}


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_stage_order():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if dep.startswith(FIXTURES) and not name.startswith(FIXTURES):
                wrong.append(f"{name} imports the fixture {dep}")
            elif name.startswith(FIXTURES):
                if layer(dep) is not None and layer(dep) > LAYERS.index(("data_process.encode",)):
                    wrong.append(f"fixture {name} imports {dep}")
            elif layer(name) is not None and layer(dep) is not None and layer(dep) > layer(name):
                wrong.append(f"{name} (layer {', '.join(LAYERS[layer(name)])}) imports the later {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_has_a_layer_and_the_model_imports_no_project_module():
    g = graph()
    assert not [n for n in g if layer(n) is None and n != "data_process" and not n.startswith(FIXTURES)]
    assert layer("nel_model.training.loop") > layer("nel_model.evaluation.metrics") > layer("nel_model.encoding")
    assert layer("nel_model.inference.linker") > layer("nel_model.rerank.llm") > layer("nel_model.training.loop")
    model = {n: deps for n, deps in g.items() if layer(n) == MODEL_LAYER}
    assert set(model) == {"nel_model.nel", "nel_model.mimic", "nel_model.losses"}
    assert all(not deps for deps in model.values()), model


def test_no_sys_path_edits():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if ".venv" not in p.parts and p.name != Path(__file__).name
                 and "sys.path.insert" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
