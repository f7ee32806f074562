"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path
from conftest import free_port

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


# Issue 12, point 13: every README snippet runs as written.

ROOT = README.parent
STANDINS = ROOT / "tests" / "diffusion_standins.py"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _run_as_torchrun(code: str, tmp_path: Path, world: int = 2) -> None:
    """Run a snippet in ``world`` processes with the environment torchrun sets."""
    import os
    import subprocess
    import sys

    port = str(free_port())
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"snippet failed on a rank:\n{code}\n{err[-3000:]}"


def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    snippets = _blocks("python")
    assert len(snippets) >= 5
    for index, code in enumerate(snippets):
        if "init_process_group" in code:
            _run_as_torchrun(code, tmp_path)
            continue
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README-snippet-{index}", "exec"), {})
        assert not [w for w in caught if "disabled the CoDD layer" in str(w.message)], f"snippet {index} never couples"
        out = capsys.readouterr().out
        if "history = fit(" in code:
            assert out.count("fit (em)") == 1  # the summary is printed once


def test_codebase_changes_are_the_lines_the_stand_ins_run():
    """Each line a README diff adds (or removes) is, verbatim, a line of the stand-ins of
    LLaDA, Dream and MDLM that tests/test_diffusion_dropin.py runs; imports must import."""
    standin_lines = {line.strip() for line in STANDINS.read_text().splitlines()}
    diffs = _blocks("diff")
    assert len(diffs) == 3
    for diff in diffs:
        changed = [line[1:].strip() for line in diff.splitlines() if line[:1] in "+-"]
        assert changed
        for line in changed:
            if line.startswith(("from ", "import ")):
                exec(line, {})
            else:
                assert line in standin_lines, f"README change {line!r} is not what the stand-ins run"


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
