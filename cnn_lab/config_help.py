"""The shipped configs by name (`--config=cnn_lab:lenet_digits`), and `--help` of the commands
that take a config: the shipped configs, and every field of one.

The field comments are read from the source of configs/common.py (each knob's one-line
comment, on its line or the line above), so the help and the file never disagree.
"""

import ast
import io
import tokenize
from pathlib import Path

import ml_collections

from cnn_lab import configs, workdir
from cnn_lab.configs import common

CONFIG_DIR = Path(configs.__file__).parent
# Modules of configs/ that hold shared code, not a config to train.
NOT_CONFIGS = ("__init__", "common")


PREFIX = "cnn_lab:"  # --config=cnn_lab:<name>[:mode]: a shipped config, from any directory.


def shipped_configs() -> dict[str, str]:
    """{name of each shipped config ("cnn_lab:lenet_digits"): its docstring's first line}."""
    found = {}
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem not in NOT_CONFIGS:
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            found[PREFIX + path.stem] = (docstring.splitlines() or [""])[0]
    return found


def config_file(value: str) -> str:
    """The file a --config value names: "cnn_lab:<name>[:mode]" becomes the shipped file's path
    (mode kept); any other value is a path already."""
    if not value.startswith(PREFIX):
        return value
    name, colon, mode = value[len(PREFIX) :].partition(":")
    path = CONFIG_DIR / f"{name}.py"
    if name in NOT_CONFIGS or not path.is_file():
        raise ValueError(
            f"--config={value}: cnn_lab ships no config {name!r}. Shipped: "
            f"{', '.join(shipped_configs())}; or pass the path of a config file."
        )
    return f"{path}{colon}{mode}"


def field_comments(source: str) -> dict[str, str]:
    """{"train.batch_size": its comment} for each `config.<field> = ...` in `source`."""
    comments: dict[int, str] = {}
    alone: set[int] = set()  # Lines that hold a comment and nothing else.
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if not token.line[: token.start[1]].strip():
                alone.add(token.start[0])
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        name = ast.unparse(node.targets[0])
        if not name.startswith("config."):
            continue
        on_lines = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, line = [], node.lineno - 1
        while line in alone:  # A comment block right above the assignment.
            above.insert(0, comments[line])
            line -= 1
        # The first comment wins: later assignments (a mode's changes) rarely carry one.
        if not found.get(name[len("config.") :]):
            found[name[len("config.") :]] = " ".join(on_lines or above)
    return found


def describe_fields(config: ml_collections.ConfigDict, config_file: str | Path) -> str:
    """Every field of `config` (loaded from `config_file`): `name = value  (type)  comment`,
    one per line; a comment in the config file wins over configs/common.py's."""
    comments = field_comments(Path(common.__file__).read_text())
    for name, comment in field_comments(Path(config_file).read_text()).items():
        comments[name] = comment or comments.get(name, "")
    lines = []
    for name, value in sorted(workdir.flatten(config.to_dict()).items()):
        kind = type(value).__name__ if value is not None else "optional"
        lines.append(f"  {name} = {value!r}  ({kind})  {comments.get(name, '')}".rstrip())
    return "\n".join(lines)


def usage(
    doc: str, flags_help: str, config: ml_collections.ConfigDict | None, config_file: str = ""
) -> str:
    """A command's help: its docstring `doc`, then the shipped configs (or, given a config
    and its file, its fields), then the flags."""
    if config is None:
        listing = [
            "configs (--config=<name> from anywhere, or its file configs/<name>.py in a "
            "checkout; with --help, a config's fields):"
        ]
        listing += [f"  {name:36} {line}" for name, line in shipped_configs().items()]
    else:
        listing = ["fields of this config (override any with --config.<field>=<value>):"]
        listing.append(describe_fields(config, config_file))
    return "\n".join([doc.strip(), "", *listing, "", "flags:", flags_help])
