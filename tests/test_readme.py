"""README.md's fenced commands and Python blocks, run as a newcomer would, in smoke form.

Every ```bash line and ```python block runs here, in README order, in one directory that
stands for a checkout (configs/ and launch/ linked in), after making what the commands name:
an image folder, an .npz, a torchvision weights file, photos. Training configs get `:smoke`
(a few steps on slices of the data). pip lines are resolved by uv for Linux x86-64 (glibc 2.35) instead
of installed (CI installs the test extra itself), and the pytest line must be .ci/run's.
"""

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, _launch_env
from PIL import Image

README = ROOT / "README.md"


def readme_blocks() -> list[tuple[str, list[str]]]:
    """README's fenced blocks in order: ("bash", its commands) or ("python", [its code])."""
    blocks = []
    for language, body in re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), re.S):
        if language == "python":
            blocks.append(("python", [body]))
            continue
        lines = body.replace("\\\n", " ").splitlines()
        commands = [part.strip() for line in lines for part in line.split(" && ")]
        blocks.append(("bash", [c for c in commands if c and not c.startswith("#")]))
    return blocks


def smoke(command: str) -> str:
    """`command` with `:smoke` added to its --config (or `,smoke` after a mode).

    The hours-long results command prints its steps instead (`--dry_run`); each step's
    config trains in smoke form in tests/test_fashion_mnist.py.
    """
    if command.startswith("python -m launch.fashion_mnist_results"):
        return f"{command} --dry_run"

    def add_mode(match: re.Match) -> str:
        spec = match.group(1)
        is_file_with_mode = spec.count(":") == (2 if spec.startswith("cnn_lab:") else 1)
        return f"--config={spec}{',smoke' if is_file_with_mode else ':smoke'}"

    return re.sub(r"--config=(\S+)", add_mode, command)


def _make_inputs(checkout: Path) -> None:
    """What the README's commands name: my_images/, my_arrays.npz, a .pth file, photos/."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (checkout / "my_images" / name).mkdir(parents=True)
        for i in range(60):  # 144 training images: more than a batch of 128.
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(checkout / "my_images" / name / f"{i}.png")
    np.savez(
        checkout / "my_arrays.npz",
        x_train=rng.integers(0, 256, (200, 12, 12), dtype=np.uint8),
        y_train=np.arange(200) % 4,
    )
    (checkout / "photos").mkdir()
    for i in range(2):
        pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(checkout / "photos" / f"photo{i}.jpg")
    torch = pytest.importorskip("torch")
    from test_import_weights import random_torchvision_model  # torchvision, made importable

    state = random_torchvision_model("resnet18").state_dict()
    torch.save(state, checkout / "resnet18-f37072fd.pth")


def test_readme_commands_are_the_ones_ci_and_users_run():
    """The test command is .ci/run's; every pip line installs the checkout or a known extra."""
    commands = [c for kind, block in readme_blocks() if kind == "bash" for c in block]
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme_test = [c for c in commands if c.startswith("python -m pytest")]
    assert readme_test == ["python -m pytest"], readme_test
    assert ci_command.replace(" -q", "") == "python -m pip install -e '.[test]' && python -m pytest"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for command in commands:
        if command.startswith("python -m pip install"):
            target = shlex.split(command)[-1]
            assert target.startswith("."), command
            named = re.findall(r"\[(.*)\]", target)
            assert all(extra in extras for extra in ",".join(named).split(",") if extra), command


@pytest.mark.slow  # Reads the package index.
def test_readme_install_lines_resolve_for_linux_x86_64(tmp_path):
    # glibc 2.35 (Ubuntu 22.04): TPU VMs' libtpu wheels need a newer glibc than 2.28.
    if shutil.which("uv") is None:
        pytest.skip("uv is not installed (it comes with the test extra)")
    commands = [c for kind, block in readme_blocks() if kind == "bash" for c in block]
    for command in commands:
        if not command.startswith("python -m pip install"):
            continue
        extras = re.findall(r"\[(.*)\]", shlex.split(command)[-1])
        extra_args = [arg for extra in extras for arg in ("--extra", extra)]
        result = subprocess.run(
            ["uv", "pip", "compile", "pyproject.toml", *extra_args, "--quiet",
             "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_35",
             "--output-file", str(tmp_path / "resolved.txt")],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if "error sending request" in result.stderr or "Failed to fetch" in result.stderr:
            pytest.skip(f"no package index reachable: {result.stderr.strip()[:300]}")
        assert result.returncode == 0, f"{command}\n{result.stderr}"


@pytest.mark.slow  # About 25 launched processes.
def test_every_readme_command_runs_in_smoke_form(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("configs", "launch"):
        (checkout / name).symlink_to(ROOT / name)
    _make_inputs(checkout)
    env = _launch_env()
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")  # Offline data only, prepared afresh.
    ran = 0
    for kind, block in readme_blocks():
        for command in block:
            if command.startswith(("python -m pip install", "python -m pytest")):
                continue  # Resolved and compared above: this process is that pytest.
            if kind == "python":
                argv = [sys.executable, "-c", command]
            else:
                # The console script is `python -m cnn_lab` (the wheel test runs the script).
                command = re.sub(r"^cnn-lab\b", "python -m cnn_lab", command)
                argv = [
                    sys.executable if word == "python" else word
                    for word in shlex.split(smoke(command))
                ]
            result = subprocess.run(
                argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, (
                f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
            ran += 1
    assert ran >= 15, ran  # Every section's commands, not a README that lost its blocks.
