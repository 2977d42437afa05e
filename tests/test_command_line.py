"""The command line: `--help` (exit 0, a usage line and an example, the shipped configs, a
config's fields) and logs fit for files (no bar frames, no colour codes, no library chatter)."""

import ast
import re
from pathlib import Path

from cnn_lab import config_help
from cnn_lab.configs import common

CONFIGS = Path(common.__file__).parent


def test_help_lists_every_shipped_config_with_its_first_docstring_line(launch):
    result = launch("cnn_lab.train", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m cnn_lab.train --config=" in result.stdout
    assert "example: python -m cnn_lab.train --config=configs/lenet_digits.py" in result.stdout
    shipped = [p for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "common")]
    assert shipped
    for path in shipped:
        first_line = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]
        assert re.search(rf"cnn_lab:{path.stem} +{re.escape(first_line)}", result.stdout), path
    assert "--workdir" in result.stdout  # The flags follow.


def test_help_with_a_config_shows_each_field_with_value_type_and_comment(launch):
    result = launch(
        "cnn_lab.train",
        "--config=configs/lenet_digits.py:smoke",
        "--config.train.num_epochs=7",
        "-h",
    )
    assert result.returncode == 0, result.stderr
    batch_comment = re.search(
        r"config\.train\.batch_size = \d+  # (.+)", CONFIGS.joinpath("common.py").read_text()
    ).group(1)
    assert "train.num_epochs = 7  (int)" in result.stdout  # The override is applied.
    assert re.search(
        rf"train\.batch_size = \d+  \(int\)  {re.escape(batch_comment)}", result.stdout
    )
    assert "configs/mlp_digits.py" not in result.stdout  # Fields instead of the config list.


def test_help_of_a_command_without_configs_exits_0(launch):
    result = launch("cnn_lab.evaluate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout


def test_field_comments_read_every_placement():
    source = """
def get_config():
    config.a = 1  # On the line.
    # Above,
    # on two lines.
    config.b = 2
    config.c = (
        3  # Inside the brackets.
    )
    config.d = 4
    config.a = 5
"""
    assert config_help.field_comments(source) == {
        "a": "On the line.",  # The first comment wins over a later bare assignment.
        "b": "Above, on two lines.",
        "c": "Inside the brackets.",
        "d": "",
    }


def test_a_redirected_training_log_is_plain_lines(launch, tmp_path):
    result = launch(
        "cnn_lab.train",
        "--config=configs/mlp_digits.py:smoke",
        "--config.train.progress_bar=True",
        f"--config.data.data_dir={tmp_path / 'tfds'}",  # Prepared in this run: TF starts.
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "epoch 2/2:" in log and "test: loss" in log
    assert "\r" not in log and "\x1b[" not in log  # No tqdm frames, no ANSI codes.
    assert not re.search(r"^[IWE]\d{4} ", log, re.MULTILINE)  # No absl lines from libraries.
    assert "Downloading and preparing" not in log and "oneDNN custom operations" not in log
