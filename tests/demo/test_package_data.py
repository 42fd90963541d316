"""The demo's assets and config ship as package data: built into a wheel and installed outside the checkout,
``sakd demo`` finds them from any working folder (the repository is not on the path)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHECK = """
import json, sys
import sakd
from sakd.demo.run import ASSETS, DEMO_CONFIG, _check_assets
from sakd.config import load_config
from sakd.models.load import load_tokenizer
_check_assets()
cfg = load_config(DEMO_CONFIG, [f"model.teacher={ASSETS / 'teacher'}"])
tok = load_tokenizer(cfg.model.teacher, "teacher")
print(json.dumps({"sakd": sakd.__file__, "assets": str(ASSETS), "vocab": len(tok), "mode": cfg.moe.mode}))
"""


@pytest.mark.slow
def test_an_installed_sakd_finds_the_demo_assets_from_another_folder(tmp_path):
    src = tmp_path / "src"  # a copy: the build's build/ and egg-info folders stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sakd", src / "sakd", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("sakd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("sakd/demo/demo.yaml", "sakd/demo/assets/teacher/model.safetensors",
                 "sakd/demo/assets/student-init/tokenizer.json", "sakd/demo/assets/student-chat.jinja",
                 "sakd/data/templates/chatml.jinja"):
        assert need in names, need
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["sakd"]).is_relative_to(site) and Path(out["assets"]).is_relative_to(site)
    assert out["vocab"] > 1000 and out["mode"] == "ka"  # the demo teacher's ~8k BPE, configs/demo.yaml's routing
