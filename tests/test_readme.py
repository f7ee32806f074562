"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## Quickstart'"
    return match.group(1)


def test_quickstart_runs_and_is_short(capsys):
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README-quickstart", "exec"), {})
    assert "tensor" in capsys.readouterr().out


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    head = "\n".join(lines[:30])
    assert "python -m diffusion.demo" in head
    assert "bash .ci/run" in head
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m venv .venv" in ci.replace("python3", "python")
    assert "python -m pytest -q -m \"not slow\"" in ci


def _testing_blocks() -> list[str]:
    section = README.read_text().split("## Testing your circuits", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "README: expected two python blocks under '## Testing your circuits'"
    return blocks


def test_testing_section_hypothesis_example_runs_as_written():
    code = _testing_blocks()[0]
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(code, "README-testing-hypothesis", "exec"), namespace)
    namespace["test_my_circuit_marginals"]()  # hypothesis runs its examples


def test_testing_section_check_circuit_example_runs_as_written(capsys):
    exec(compile(_testing_blocks()[1], "README-testing-check", "exec"), {})
    out = capsys.readouterr().out
    assert "sampling:" in out and "comparisons passed" in out
