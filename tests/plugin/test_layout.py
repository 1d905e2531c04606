"""The package's rooms: ``vllm_w4a8_fastprep/`` holds what vLLM loads and
imports nothing from ``vllm_w4a8_fastprep/tools/`` (the command line and the
tools of the tests, benchmarks and evals); nothing outside ``tests/`` imports
from ``tests/``."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_w4a8_fastprep"
ENTRY = {"__main__.py"}  # ``python -m vllm_w4a8_fastprep``: the command line


def _imports(path: pathlib.Path):
    """(module, level) of each import in ``path``: ``from .tools import x``
    -> ("tools", 1), ``import a.b`` -> ("a.b", 0)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, 0, []


def test_the_serving_half_imports_nothing_from_the_tools():
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ENTRY:
            continue
        for module, level, names in _imports(path):
            absolute = module if level == 0 else f"vllm_w4a8_fastprep.{module}".rstrip(".")
            if absolute.startswith("vllm_w4a8_fastprep.tools") or (
                    absolute == "vllm_w4a8_fastprep" and "tools" in names):
                bad.append(f"{path.name}: {'.' * level}{module}")
    assert not bad, bad
    assert (PACKAGE / "tools" / "__init__.py").is_file()


def test_nothing_outside_tests_imports_from_tests():
    support = {p.stem for p in (ROOT / "tests").rglob("*.py")}
    bad = []
    for folder in ("vllm_w4a8_fastprep", "benchmarks", "evals"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, level, _ in _imports(path):
                if level == 0 and (module.split(".")[0] in support or module.startswith("tests")):
                    bad.append(f"{path.relative_to(ROOT)}: import {module}")
            for node in ast.walk(ast.parse(path.read_text())):  # a path built into tests/
                if isinstance(node, ast.Constant) and node.value in ("tests", "tests/"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: a path into tests/")
    for path in sorted(ROOT.glob("*/*.sh")):
        for line in path.read_text().splitlines():
            if "python3 tests/" in line or "python tests/" in line:
                bad.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not bad, bad


def test_the_moe_method_does_not_import_the_dense_scheme():
    """Each needs compat (vLLM's questions) and the format's constants, not
    the other."""
    got = [(m, level) for m, level, _ in _imports(PACKAGE / "moe.py") if m == "scheme"]
    assert not got, got
