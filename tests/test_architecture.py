"""The shape of the house: imports go one way, all at the top of each module."""
import ast

from conftest import ROOT

MODULES = {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def project_imports(tree: ast.Module):
    """(node, imported project module) for every import in the tree, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        yield from ((node, name) for name in names if name in MODULES)


def graph() -> dict[str, set[str]]:
    return {name: {dep for _, dep in project_imports(ast.parse(path.read_text()))} - {name}
            for name, path in MODULES.items()}


def test_no_module_imports_a_project_module_inside_a_function():
    inside = [f"{name}.py:{node.lineno} imports {dep}"
              for name, path in MODULES.items()
              for node, dep in project_imports(ast.parse(path.read_text()))
              if node.col_offset > 0]
    assert inside == []


def test_the_import_graph_has_no_cycle():
    edges, done, path = graph(), set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for dep in sorted(edges[name]):
            visit(dep)
        path.pop()
        done.add(name)
    for name in edges:
        visit(name)
    assert edges["config"] == set()  # the bottom: imported by all, importing no project module


def test_the_checker_sees_a_cycle_and_a_local_import(tmp_path, monkeypatch):
    """The two tests above can fail: on a planted cycle and a planted function-level import."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    (tmp_path / "config.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "MODULES", {p.stem: p for p in tmp_path.glob("*.py")})
    for check in (test_no_module_imports_a_project_module_inside_a_function, test_the_import_graph_has_no_cycle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted problem")
