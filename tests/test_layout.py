"""Imports run one way: the library (`vqrae/*.py`) never imports the training package; training imports the library;
the command-line tools sit on top."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "vqrae"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """`(line, absolute module name)` of every import in `path` (relative imports resolved against the package)."""
    package = ["vqrae"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_the_library_never_imports_the_training_package():
    modules = sorted(LIBRARY.glob("*.py"))
    assert {path.name for path in modules} >= {"modeling_vqrae.py", "tokenize.py", "image_data.py"}
    upward = [
        f"{path.name}:{line} imports {module}"
        for path in modules
        for line, module in _imported_modules(path)
        if module == "vqrae.training" or module.startswith("vqrae.training.")
    ]
    assert not upward, upward


def test_library_modules_never_import_the_command_line_helpers():
    """Only the command-line tools (`cli_utils.py` itself and `tokenize.py`, vqrae-tokenize) use `vqrae.cli_utils`;
    the rest of the library raises its own `vqrae.errors.UsageError`."""
    tools = {"cli_utils.py", "tokenize.py"}
    modules = [path for path in sorted(LIBRARY.glob("*.py")) if path.name not in tools]
    assert {path.name for path in modules} >= {"image_data.py", "token_dataset.py", "modeling_vqrae.py"}
    upward = [
        f"{path.name}:{line} imports {module}"
        for path in modules
        for line, module in _imported_modules(path)
        if module == "vqrae.cli_utils" or module.startswith("vqrae.cli_utils.")
    ]
    assert not upward, upward


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    source = "from .training.data import TrainingBatches\nimport vqrae.training.trainer\nfrom .image_data import x\n"
    (tmp_path / "module.py").write_text(source)
    modules = {module for _, module in _imported_modules(tmp_path / "module.py")}
    assert {"vqrae.training.data", "vqrae.training.trainer", "vqrae.image_data"} <= modules
