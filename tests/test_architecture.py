"""The package's shape, checked: no module reaches into another's private names, and add-markers' stages stay
small enough to read whole."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sft_toolkit"
MAX_MARKERS_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_module(path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of the module an import statement reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    """`_name` is a module's own; `__version__` and other dunders are public by convention."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _imported_module(path, node)
            if source != "sft_toolkit" and not source.startswith("sft_toolkit."):
                continue  # other packages (and __future__) are theirs to name
            for alias in node.names:
                if _private(alias.name):
                    where = path.relative_to(PACKAGE.parent)
                    offences.append(f"{where}:{node.lineno} imports {alias.name} from {source}")
    assert offences == []


def test_the_checker_sees_a_private_import():
    """The check above can fail: a relative import of a private name is resolved and caught."""
    tree = ast.parse("from ..lint import _check_probe\n")
    node = tree.body[0]
    assert _imported_module(PACKAGE / "markers" / "place.py", node) == "sft_toolkit.lint"
    assert _private(node.names[0].name) and not _private("__version__")


def test_no_markers_module_is_over_400_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "markers").glob("*.py")}
    assert sizes and all(size <= MAX_MARKERS_MODULE_LINES for size in sizes.values()), sizes
