"""Installability: the dependencies resolve, as wheels, on each supported platform; the package
claims no generic top-level names, and a wheel installed elsewhere runs shipped configs by name.

uv resolves for a target platform (its markers and wheel tags), where pip applies this
machine's markers whatever `--platform` says. It reads package metadata from the index:
a machine without one skips, saying so.
"""

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# (uv's name of the platform, packages that must resolve there, packages that must not).
PLATFORMS = {
    "x86_64-manylinux_2_28": (["tensorflow-cpu", "jax", "onednn-cpu-gomp"], ["tensorflow"]),
    "aarch64-manylinux_2_28": (["tensorflow", "jax"], ["tensorflow-cpu", "onednn-cpu-gomp"]),
    "aarch64-apple-darwin": (["tensorflow", "jax"], ["tensorflow-cpu", "onednn-cpu-gomp"]),
}


@pytest.mark.slow  # Reads the package index.
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_dependencies_resolve_to_wheels_on(platform, tmp_path):
    if shutil.which("uv") is None:
        pytest.skip("uv is not installed (it comes with the test extra)")
    result = subprocess.run(
        [
            "uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--quiet",
            "--python-version", "3.11", "--python-platform", platform,
            # Every package as a wheel, but promise (a TFDS dependency): pure Python, no wheel.
            "--only-binary", ":all:", "--no-binary", "promise",
            "--output-file", str(tmp_path / "resolved.txt"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if "error sending request" in result.stderr or "Failed to fetch" in result.stderr:
        pytest.skip(f"no package index reachable: {result.stderr.strip()[:300]}")
    assert result.returncode == 0, result.stderr
    resolved = {
        line.split("==")[0]
        for line in (tmp_path / "resolved.txt").read_text().splitlines()
        if "==" in line
    }
    present, absent = PLATFORMS[platform]
    assert set(present) <= resolved, set(present) - resolved
    assert not set(absent) & resolved, set(absent) & resolved


def test_the_package_list_holds_every_package_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cnn_lab").rglob("__init__.py")
    }
    mapped = {name for name in setuptools["package-dir"]}
    assert set(setuptools["packages"]) == folders | mapped
    assert all(name.startswith("cnn_lab.") for name in mapped)  # No generic top-level names.


@pytest.mark.slow  # Builds a wheel, installs it into a new environment and trains there.
def test_a_wheel_installed_elsewhere_trains_a_shipped_config_by_name(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = shutil.copytree(
        ROOT, tmp_path / "source",
        ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"),
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    venv = tmp_path / "venv"
    # The dependencies come from this environment; cnn_lab itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    (wheel,) = (tmp_path / "wheel").glob("cnn_lab-*.whl")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    elsewhere = tmp_path / "project"  # A user's project with a `configs` package of its own.
    (elsewhere / "configs").mkdir(parents=True)
    (elsewhere / "configs" / "__init__.py").write_text("OWNER = 'the user'\n")
    (elsewhere / "my_config.py").write_text(
        "from cnn_lab.configs import mlp_digits\n"
        "from configs import OWNER\n\n\n"
        "def get_config(mode=None):\n"
        "    config = mlp_digits.get_config(mode)\n"
        "    config.seed = 7 if OWNER == 'the user' else 0\n"
        "    return config\n"
    )

    def run(*args, program=python):
        return subprocess.run(
            [program, *args], cwd=elsewhere, capture_output=True, text=True, timeout=600
        )

    where = run("-c", "import cnn_lab, configs; print(cnn_lab.__file__, configs.OWNER)")
    assert str(venv) in where.stdout and "the user" in where.stdout, where.stderr
    trained = run(
        "-m", "cnn_lab.train", "--config=cnn_lab:mlp_digits:smoke", "--workdir=run",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "test: loss" in trained.stdout
    own = run("-m", "cnn_lab.train", "--config=my_config.py", "--help")
    assert own.returncode == 0, own.stderr[-3000:]
    assert "seed = 7  (int)" in own.stdout  # The user's config, built on cnn_lab's.
    # The console script: its commands, and a shipped config trained by name through it.
    cnn_lab_script = str(venv / "bin" / "cnn-lab")
    usage = run("--help", program=cnn_lab_script)
    assert usage.returncode == 0 and "import-weights" in usage.stdout, usage.stderr
    trained = run(
        "train", "--config=cnn_lab:lenet_digits:smoke", "--workdir=run_by_script",
        f"--config.data.data_dir={tmp_path / 'tfds'}", program=cnn_lab_script,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (elsewhere / "run_by_script" / "metrics.jsonl").exists()
    own = run("train", "--config=my_config.py", "--help", program=cnn_lab_script)
    assert "seed = 7  (int)" in own.stdout, own.stderr[-3000:]  # Its directory imports, too.


def test_the_package_imports_its_configs_and_launchers_by_their_installed_names():
    # In a checkout `configs` and `launch` import from the working directory; installed, they
    # are cnn_lab.configs and cnn_lab.launch only.
    stray = []
    for folder in ("cnn_lab", "configs", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                stray += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for name in names
                    if name.split(".")[0] in ("configs", "launch")
                ]
    assert not stray, stray
