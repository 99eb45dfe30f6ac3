"""Packaging facts stated in more than one file stay the same: the README's supported-versions table states
setup.py's ranges, CI runs exactly the README's test command, and there is one version."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import csa_kernels
import storydiff

ROOT = Path(__file__).resolve().parents[2]


def _setup_call_and_requires() -> tuple[dict[str, ast.expr], list[str]]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    requires = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REQUIRES" for t in node.targets)
    )
    call = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and node.value.func.id == "setup"
    )
    return {kw.arg: kw.value for kw in call.keywords}, requires


def _readme_rows() -> dict[str, str]:
    """package → range, from the README's "Supported versions" table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([A-Za-z]+)[^|]* \| `([^`]+)` \|", section, re.M)
    return {name.lower(): spec for name, spec in rows}


def test_readme_table_states_the_ranges_of_setup_py():
    keywords, requires = _setup_call_and_requires()
    rows = _readme_rows()
    assert rows.pop("python") == ast.literal_eval(keywords["python_requires"])
    ranged = {}
    for requirement in requires:
        spec = requirement.split(";")[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*([<>=!~].*)?", spec)
        if match.group(2):  # unversioned requirements (numpy, pillow, ...) are not in the table
            ranged[match.group(1).lower()] = match.group(2)
    assert rows == ranged


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"^Tests \(.*?\n```bash\n(.+?)\n```", readme, re.M | re.S).group(1)
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [command]
    assert "torch==2.13.0" in command  # our machines' local CPU wheel, not a CUDA download


def test_one_version():
    keywords, _ = _setup_call_and_requires()
    assert isinstance(keywords["version"], ast.Name)  # read from csa_kernels/__init__.py, not a literal
    assert csa_kernels.__version__ == storydiff.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{storydiff.__version__}]" in changelog
