"""`cnn-lab <command>` (and `python -m cnn_lab <command>`): each command is its module's
`python -m` form, the help lists them all, and a misspelled command names the closest."""

import ast
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnn_lab import cli

ROOT = Path(__file__).resolve().parents[1]


def _has_main_guard(path: str) -> bool:
    """Whether the module file at `path` has an `if __name__ == "__main__":` block."""
    return any(
        isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
        for node in ast.parse(Path(path).read_text()).body
    )


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_names_a_module_runnable_as_main(name):
    spec = importlib.util.find_spec(cli.COMMANDS[name].module)
    assert spec is not None and spec.origin, cli.COMMANDS[name]
    assert _has_main_guard(spec.origin), spec.origin


def test_every_documented_python_m_command_has_a_command():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    documented = {
        module.replace("launch.", "cnn_lab.launch.", 1) if module.startswith("launch.") else module
        for path in documents
        for module in re.findall(r"python -m ((?:cnn_lab|launch)\.[\w.]+\w)", path.read_text())
    }
    assert documented, "README.md shows no `python -m cnn_lab.<command>`"
    assert documented <= {c.module for c in cli.COMMANDS.values()}


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["help"]])
def test_help_lists_every_command_with_an_example_and_exits_0(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cnn-lab", *args])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cnn-lab <command>")
    for name, command in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.summary)}$", out, re.M), name
    assert f"example: {cli.EXAMPLE}" in out


@pytest.mark.parametrize(("typed", "suggested"), [("trian", "train"), ("evaluat", "evaluate")])
def test_an_unknown_command_exits_2_naming_the_closest(typed, suggested, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cnn-lab", typed, "--workdir=runs/x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{typed!r} is not a cnn-lab command. Did you mean {suggested}" in err


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A `probe` command whose module records how it was run in probe.json, then exits 75."""
    (tmp_path / "probe.py").write_text(
        "import json, pathlib, sys\n"
        "record = {'argv': sys.argv, 'main_is_me': sys.modules['__main__'].__dict__ is globals()}\n"
        "if __name__ == '__main__':\n"
        "    pathlib.Path(__file__).with_suffix('.json').write_text(json.dumps(record))\n"
        "    sys.exit(75)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setitem(cli.COMMANDS, "probe", cli.Command("probe", "records its run"))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "its_args"),
    [(["probe", "--flag=1", "rest"], ["--flag=1", "rest"]), (["help", "probe"], ["--help"])],
)
def test_a_command_runs_its_module_as_main_with_the_flags_and_exit_code(probe, args, its_args):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cnn-lab", *args])
    assert exit_.value.code == 75
    # argv[0] is the module's file, as under `python -m`; the rest are the user's.
    ran = json.loads((probe / "probe.json").read_text())
    assert ran == {"argv": [str(probe / "probe.py"), *its_args], "main_is_me": True}


def test_the_command_line_imports_nothing_heavy():
    # cnn_lab.train's SIGTERM handler must be installed before JAX and TensorFlow load.
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys, cnn_lab.cli; print(json.dumps(list(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert not {"jax", "tensorflow", "absl", "numpy", "ml_collections"} & set(json.loads(loaded))


def test_python_m_cnn_lab_runs_without_the_script(launch):
    usage = launch("cnn_lab")
    assert usage.returncode == 0 and "import-weights" in usage.stdout, usage.stderr
    evaluate = launch("cnn_lab", "evaluate", "--help")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "--workdir" in evaluate.stdout and "python -m cnn_lab.evaluate" in evaluate.stdout


def _metrics_without_timings(workdir: Path) -> list[dict]:
    """metrics.jsonl's records, without the fields that measure time."""
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith(("_seconds", "_per_second"))}
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow  # Two smoke runs as processes: about 30 s each on a loaded machine.
def test_cnn_lab_train_is_python_m_cnn_lab_train(launch, tmp_path):
    flags = ["--config=configs/lenet_digits.py:smoke", f"--config.data.data_dir={tmp_path}/tfds"]
    via_cli = launch("cnn_lab", "train", *flags, f"--workdir={tmp_path / 'cli'}")
    assert via_cli.returncode == 0, via_cli.stderr[-3000:]
    direct = launch("cnn_lab.train", *flags, f"--workdir={tmp_path / 'direct'}")
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "test: loss" in via_cli.stdout
    assert _metrics_without_timings(tmp_path / "cli") == _metrics_without_timings(
        tmp_path / "direct"
    )


def test_sigterm_while_train_imports_exits_preempted(launch_env, tmp_path):
    # cnn_lab.train's handler, installed before its imports, is in place under cnn-lab too.
    from cnn_lab.train import PREEMPTED_EXIT_CODE

    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_lab", "train", "--config=configs/lenet_digits.py:smoke",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)  # Importing jax, flax and TensorFlow takes seconds.
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert not (tmp_path / "run").exists()
