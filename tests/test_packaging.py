"""What an installed vqrae (a wheel, not this checkout) carries: the training presets, found by name from any
working directory."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from vqrae.cli.train import parse_train_args
from vqrae.training.args import options_to_dict
from vqrae.training.config_files import preset_config_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("cosmos_fsq", "standard_fsq", "tiny_cpu", "vq")


def test_the_checkout_configs_folder_is_the_package_presets():
    # README commands use `--config configs/NAME.yaml`; the files they read are those the package ships.
    assert (ROOT / "configs").resolve() == preset_config_dir().resolve() == (ROOT / "src" / "vqrae" / "configs")
    assert {path.stem for path in preset_config_dir().glob("*.yaml")} == set(PRESETS)


def test_the_presets_ship_in_the_wheel_and_resolve_by_name_when_installed(installed_wheel, tmp_path):
    wheel, site = installed_wheel
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            Path(name).name: archive.read(name)
            for name in archive.namelist()
            if name.startswith("vqrae/configs/") and name.endswith(".yaml")
        }
    assert shipped == {path.name: path.read_bytes() for path in preset_config_dir().glob("*.yaml")}
    script = (
        "import json, sys, vqrae\n"
        f"assert vqrae.__file__.startswith({str(site)!r}), vqrae.__file__\n"
        "from vqrae.cli.train import parse_train_args\n"
        "from vqrae.training.args import options_to_dict\n"
        "from vqrae.training.config_files import preset_config_dir\n"
        f"assert str(preset_config_dir()).startswith({str(site)!r}), preset_config_dir()\n"
        "parse = parse_train_args\n"
        f"print(json.dumps({{name: options_to_dict(*parse(['--config', name])) for name in {PRESETS!r}}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    installed = json.loads(result.stdout)
    assert installed == {name: options_to_dict(*parse_train_args(["--config", name])) for name in PRESETS}
    assert installed["cosmos_fsq"]["quantizer"] == "cosmos_fsq" and installed["vq"]["quantizer"] == "vq"
