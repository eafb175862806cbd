"""Imports run one way: the library (`vqrae/*.py`) never imports the training package; training imports the library;
the command-line tools (`vqrae/cli/`) sit on top and nothing below imports them."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "vqrae"


def _imported_modules(path: Path, package: list[str] | None = None) -> list[tuple[int, str]]:
    """`(line, absolute module name)` of every import in `path` (relative imports resolved against its package,
    by default the one under `src/vqrae` the file is in)."""
    if package is None:
        package = ["vqrae", *path.resolve().parent.relative_to(LIBRARY).parts]
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


def test_the_library_and_training_never_import_the_command_line_package():
    """The command-line tools (`vqrae/cli/`) sit on top: the library and the training package raise their own
    `vqrae.errors.UsageError` and never import them (nor the old `vqrae.cli_utils`)."""
    modules = [*sorted(LIBRARY.glob("*.py")), *sorted((LIBRARY / "training").glob("*.py"))]
    assert {path.name for path in modules} >= {"image_data.py", "tokenize.py", "trainer.py", "evaluate.py", "hub.py"}
    upward = [
        f"{path.relative_to(LIBRARY)}:{line} imports {module}"
        for path in modules
        for line, module in _imported_modules(path)
        if module.split(".")[:2] in (["vqrae", "cli"], ["vqrae", "cli_utils"])
    ]
    assert not upward, upward


def test_evaluate_does_not_import_the_tokenize_job():
    """Both run a trained model; what they share (`vqrae.loading`) lives below them both."""
    imported = [module for _, module in _imported_modules(LIBRARY / "training" / "evaluate.py")]
    assert not [module for module in imported if module.split(".")[:2] == ["vqrae", "tokenize"]], imported


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    source = "from .training.data import TrainingBatches\nimport vqrae.training.trainer\nfrom .image_data import x\n"
    (tmp_path / "module.py").write_text(source)
    modules = {module for _, module in _imported_modules(tmp_path / "module.py", package=["vqrae"])}
    assert {"vqrae.training.data", "vqrae.training.trainer", "vqrae.image_data"} <= modules
    (tmp_path / "trainer.py").write_text("from ..cli.common import run_cli\nfrom .data import x\n")
    modules = {module for _, module in _imported_modules(tmp_path / "trainer.py", package=["vqrae", "training"])}
    assert {"vqrae.cli.common", "vqrae.training.data"} <= modules
