"""The README's Python examples run as written (in order, sharing one namespace)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["opt"], torch.optim.Optimizer)
