"""The README's Python example runs as printed (from the repository root, as a reader would)."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        scope: dict = {}
        exec(compile(blocks[0], "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["bpd"].shape == (16,) and scope["samples"].dtype.__str__() == "torch.uint8"
    assert (scope["y"] - scope["zs"][0].new_zeros(1)).shape == (16, 1, 8, 8)
