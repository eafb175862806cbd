"""The source stays readable: files of at most 500 lines (`modeling_vqrae.py` 650), functions of at most 80, and
imports at the top of a file except for optional dependencies (an import inside `try: ... except ImportError`)."""

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "vqrae"
FILE_LIMITS = {"modeling_vqrae.py": 650}


def _optional_imports(tree: ast.AST) -> set[ast.AST]:
    """Imports inside a `try` whose handlers catch ImportError (or ModuleNotFoundError)."""
    found = set()
    for node in ast.walk(tree):
        names = [ast.unparse(handler.type) for handler in getattr(node, "handlers", []) if handler.type is not None]
        if isinstance(node, ast.Try) and any("ImportError" in n or "ModuleNotFoundError" in n for n in names):
            found |= {
                sub for part in node.body for sub in ast.walk(part) if isinstance(sub, ast.Import | ast.ImportFrom)
            }
    return found


def shape_problems(path: Path, name: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    problems = []
    if len(text.splitlines()) > FILE_LIMITS.get(path.name, 500):
        problems.append(f"{name} has {len(text.splitlines())} lines")
    tree = ast.parse(text)
    optional = _optional_imports(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        if node.end_lineno - start + 1 > 80:
            problems.append(f"{name}:{start} {node.name} has {node.end_lineno - start + 1} lines")
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom) and sub not in optional:
                problems.append(f"{name}:{sub.lineno} imports inside {node.name}")
    return problems


def test_files_functions_and_imports_keep_their_shape():
    names = {path.relative_to(SOURCE).as_posix(): path for path in SOURCE.rglob("*.py")}
    problems = [problem for name, path in sorted(names.items()) for problem in shape_problems(path, name)]
    assert not problems, problems


def test_the_shape_check_sees_a_long_function_and_a_late_import(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    late = "def late():\n    import json\n    try:\n        import yaml\n    except ImportError:\n        pass\n"
    source = f"def long():\n{body}\n\n{late}"
    (tmp_path / "module.py").write_text(source)
    problems = shape_problems(tmp_path / "module.py", "module.py")
    assert problems == ["module.py:1 long has 81 lines", "module.py:85 imports inside late"]
