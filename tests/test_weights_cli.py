"""The import and export commands: what they print, and one `error:` line for each mistake."""

import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_export import blocking
from test_import_weights import random_torchvision_model, save_both_formats


def _command(*args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m cnn_lab.<args>`, with the modules `blocked` made unimportable."""
    module, *flags = args
    script = (
        blocking(blocked) + f"sys.argv = {[module, *flags]!r}\n"
        f"from cnn_lab.{module} import main\nmain()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )


def _one_error(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """torchvision's ResNet-18 (random weights) as model.pth and model.safetensors."""
    directory = tmp_path_factory.mktemp("resnet18")
    return save_both_formats(random_torchvision_model("resnet18"), directory)


@pytest.fixture(scope="module")
def imported(resnet18_files, tmp_path_factory):
    """That ResNet-18 imported with the documented command."""
    output = tmp_path_factory.mktemp("imported") / "resnet18"
    result = _command(
        "import_weights", "--arch=resnet18", f"--source={resnet18_files[1]}", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr
    assert f"Imported resnet18 into {output}" in result.stdout
    return output


def test_a_file_of_another_architecture_lists_the_first_mismatches(resnet18_files, tmp_path):
    line = _one_error(
        _command(
            "import_weights",
            "--arch=resnet50",
            f"--source={resnet18_files[0]}",
            f"--output={tmp_path / 'out'}",
        )
    )
    assert "layer1.0.conv1.weight has shape (64, 64, 3, 3), expected (64, 64, 1, 1)" in line
    assert "layer1.0.conv3.weight (256, 64, 1, 1) is missing" in line
    assert "pass the --arch it was saved from" in line
    assert not (tmp_path / "out").exists()  # Nothing written.


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_truncated_file_is_named(resnet18_files, tmp_path, suffix):
    source = next(p for p in resnet18_files if p.suffix == suffix)
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    line = _one_error(
        _command(
            "import_weights",
            "--arch=resnet18",
            f"--source={truncated}",
            f"--output={tmp_path / 'o'}",
        )
    )
    assert f"--source='{truncated}' cannot be read" in line and "truncated" in line


def test_an_unknown_arch_lists_the_known_ones(tmp_path):
    source = tmp_path / "w.safetensors"
    save_file({"fc.weight": np.zeros((2, 2), np.float32)}, source)
    line = _one_error(
        _command(
            "import_weights", "--arch=resnet51", f"--source={source}", f"--output={tmp_path}/o"
        )
    )
    assert "--arch='resnet51'" in line and "resnet50" in line and "vgg16_bn" in line


def test_a_pth_file_without_torch_names_the_extra(resnet18_files, tmp_path):
    line = _one_error(
        _command(
            "import_weights",
            "--arch=resnet18",
            f"--source={resnet18_files[0]}",
            f"--output={tmp_path / 'o'}",
            blocked=("torch",),
        )
    )
    assert "pip install 'cnn_lab[torch]'" in line


def test_export_of_a_workdir_without_checkpoint(imported, tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_bytes((imported / "config.json").read_bytes())
    line = _one_error(_command("export", f"--workdir={empty}", "--format=stablehlo"))
    assert "has no best/ directory" in line


def test_export_command_writes_the_artifact_and_class_names(imported, tmp_path):
    result = _command(
        "export", f"--workdir={imported}", "--format=stablehlo", f"--output={tmp_path / 'o'}"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "model.stablehlo").stat().st_size > 40e6  # ResNet-18's weights
    assert (tmp_path / "o" / "class_names.txt").read_text().startswith("tench\n")
