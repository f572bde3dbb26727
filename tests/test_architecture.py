"""The shape of the code, enforced: thin stages over a library (import-linter contracts in pyproject.toml),
ruff's checks including C901 (max-complexity in pyproject.toml), and short functions."""

import ast
import subprocess
import sys
from pathlib import Path

from kr3.config import ROOT

BIN = Path(sys.executable).parent
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold():
    proc = subprocess.run([str(BIN / "lint-imports")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_ruff_and_complexity():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "kr3", "tests", "bench", "run.py"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_no_function_in_kr3_is_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "kr3").rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
