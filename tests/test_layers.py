"""The package's layers, as CI checks them: import-linter's contracts (pyproject.toml), and no import cycle at
any level — not between packages, not between a package and its own modules, not between two modules."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back_at_any_level():
    import grimp

    graph = grimp.build_graph("lkd_ray")  # every import statement, those inside functions included
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []
    # the check can fail: a cycle a package's __init__ and a module of it would form is found
    edges.setdefault("lkd_ray.data.vision", set()).add("lkd_ray.data")
    assert ["lkd_ray.data", "lkd_ray.data.vision"] in _cycles(edges)


def test_the_model_vocabulary_of_the_config_is_what_the_registry_builds():
    from lkd_ray.config import MODEL_NAMES
    from lkd_ray.models import build_model
    from lkd_ray.models.registry import MODEL_NAMES as BUILT

    assert tuple(BUILT) == MODEL_NAMES
    assert build_model("cnn_student", 10, 1) is not None
