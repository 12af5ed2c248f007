"""The core imports torch and nothing of ours: ``pmf_ref`` never imports ``toy`` or ``full``."""
import ast
import pathlib
import subprocess
import sys

import pmf_ref as P

PACKAGE_DIR = pathlib.Path(P.__file__).parent
FORBIDDEN = ("toy", "full")
ALLOWED_TOP_LEVEL = {"__future__", "typing", "dataclasses", "math", "torch", "pmf_ref"}


def test_pmf_ref_import_pulls_in_neither_toy_nor_full():
    code = ("import sys, pmf_ref; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('toy', 'full')); "
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE_DIR.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("pmf_ref" if node.level > 0 else node.module.split(".")[0])
    return names


def test_pmf_ref_source_imports_only_torch_and_the_standard_library():
    sources = sorted(PACKAGE_DIR.glob("*.py"))
    assert sources
    for path in sources:
        imported = _imported_modules(path)
        assert not imported & set(FORBIDDEN), (path.name, imported)
        assert imported <= ALLOWED_TOP_LEVEL, (path.name, imported - ALLOWED_TOP_LEVEL)
        text = path.read_text()
        for name in FORBIDDEN:
            assert f"import {name}" not in text and f"from {name}" not in text, (path.name, name)


def test_every_full_module_has_its_test_file_and_only_the_benchmarks_import_toy():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    modules = [p.stem for p in (root / "full").glob("*.py") if p.stem != "__init__"]
    packages = [p.name for p in (root / "full").iterdir() if (p / "__init__.py").is_file()]
    missing = [name for name in modules + packages if not (root / "tests" / f"test_full_{name}.py").is_file()]
    assert not missing, f"full modules without tests/test_full_<name>.py: {missing}"
    importers = sorted(str(p.relative_to(root)) for p in (root / "full").rglob("*.py")
                       if "import toy" in p.read_text() or "from toy" in p.read_text())
    assert all(path.startswith("full/bench/") for path in importers), importers


def test_pmf_ref_uses_no_private_torch_api():
    """The core is the torch.func reference: no ``torch._C``, ``torch._foo`` or ``fwAD._bar`` (the cheap-JVP
    engine and its private calls live in full/fast_jvp.py)."""
    import re
    private = re.compile(r"\btorch(\.\w+)*\._\w+|\bfwAD\._\w+|\bforward_ad\._\w+")
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not private.search(code), f"{path.name}:{number}: {line.strip()}"


CORE_TESTS = ("test_path.py", "test_meanflow.py", "test_sampling.py", "test_checks.py", "test_imports.py",
              "oracles.py", "strategies.py", "conftest.py")
"""The core's tests and their helpers: they run without ``full`` or ``toy``."""


def test_core_tests_import_neither_toy_nor_full():
    tests = pathlib.Path(__file__).resolve().parent
    for name in CORE_TESTS:
        imported = _imported_modules(tests / name)
        assert not imported & set(FORBIDDEN), (name, imported & set(FORBIDDEN))
