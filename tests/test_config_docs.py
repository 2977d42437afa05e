"""Every config file's docstring gives its train command and its expected result."""

import importlib
import re
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


def test_the_config_files_are_found():
    assert len(NAMES) >= 21 and "lenet_digits" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_the_command_and_the_expected_result(name):
    doc = importlib.import_module(f"configs.{name}").__doc__
    # Continued command lines keep their backslash (a lone one in the source would join them).
    commands = re.findall(r"^ {4}python -m cnn_lab\.train (?:.*\\\n)*.*$", doc, re.MULTILINE)
    assert any(f"--config=configs/{name}.py" in c and "--workdir=" in c for c in commands), doc
    assert not any(re.search(r"\S {2,}\S", c) for c in commands), doc  # A joined line.
    assert re.search(r"^Expected: ", doc, re.MULTILINE), doc
