"""The README's Python snippets: each runs as it is, and passes mypy against this checkout's package."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_there_are_snippets():
    assert len(SNIPPETS) >= 2


# Snippets of the framework integrations need their framework (CI stage 5 has them).
_FRAMEWORKS = {"lightning": "lightning", "transformers": "transformers"}


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_runs(i, tmp_path, monkeypatch):
    for module, name in _FRAMEWORKS.items():
        if re.search(rf"^import {module}\b", SNIPPETS[i], re.M):
            pytest.importorskip(module, reason=f"this snippet needs {name}")
    monkeypatch.chdir(tmp_path)  # what the snippets write lands here
    exec(compile(SNIPPETS[i], f"README.md snippet {i}", "exec"), {"__name__": "readme"})


def test_snippets_pass_mypy(tmp_path):
    files = []
    for i, code in enumerate(SNIPPETS):
        files.append(tmp_path / f"snippet{i}.py")
        files[-1].write_text(code)
    # follow-imports=silent: the snippets are checked against the package's signatures; the package's own
    # modules are not what this test is about.
    res = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                          "--no-incremental", "--cache-dir", str(tmp_path / "cache"), *map(str, files)],
                         cwd=tmp_path, env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_layout_names_every_file():
    layout = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    files = [p for p in (ROOT / "collab_fast").rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix in (".py", ".cpp", ".cu", ".json") and p.name != "__init__.py"]
    files += [p for d in ("benchmarks", "scripts") for p in (ROOT / d).glob("*") if p.is_file()]
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in layout]
    assert files and not missing, f"README's Layout omits {missing}"
