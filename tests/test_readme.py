"""Every ```python block in README.md runs as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert _blocks(), "README.md has no python examples"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(_blocks()):
        exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})
