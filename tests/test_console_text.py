"""What the command-line tools print must be encodable in cp1252, the console code page of the
ComfyUI portable build on Windows: no arrows, no math signs, no Greek letters in printed text.
Read from the source: every string literal of the command modules except docstrings."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [REPO / "__main__.py", REPO / "edm2" / "__main__.py", *sorted((REPO / "testbed").glob("*.py"))]


def _unprintable(source: str):
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    bad = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            try:
                n.value.encode("cp1252")
            except UnicodeEncodeError:
                bad.append((n.lineno, n.value[:60]))
    return bad


def test_the_commands_print_only_cp1252_text():
    bad = [(p.relative_to(REPO).as_posix(), *b) for p in COMMANDS for b in _unprintable(p.read_text(encoding="utf-8"))]
    assert not bad, f"string literals a cp1252 console cannot print: {bad}"


def test_the_check_sees_an_arrow_but_not_a_docstring():
    assert _unprintable('"""docstring: \u2191 is fine here"""\nx = "ok \u00b1 \u00d7 \u2014"\n') == []
    assert _unprintable('x = "precision \u2191"\n') == [(1, "precision \u2191")]
