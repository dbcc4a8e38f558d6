"""`pip install .` ships what the console entry points need: the Hydra configs and latency tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_runs_from_anywhere_with_its_shipped_configs(tmp_path: Path) -> None:
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    shipped = {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}
    assert {p.relative_to(target / "nvit_lightning" / "conf")
            for p in (target / "nvit_lightning" / "conf").rglob("*.yaml")} == shipped
    env = {**{k: v for k, v in os.environ.items() if k not in ("NVIT_ROOT", "NVIT_TABLES")},
           "PYTHONPATH": str(target)}  # the installed copy only: no checkout on the path
    for script in ("nvit-train", "nvit-prune"):
        result = subprocess.run([sys.executable, str(target / "bin" / script), "--cfg", "job", "--resolve"],
                                capture_output=True, text=True, cwd=work, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        cfg = yaml.safe_load(result.stdout)
        table = Path(cfg["latency"]["path"])
        assert table.is_file() and table.parent == target / "nvit_lightning" / "latency_tables"
        assert Path(cfg["paths"]["data_dir"]) == work / "data"  # data and outputs: the working directory
    help_text = subprocess.run([sys.executable, str(target / "bin" / "nvit-prune"), "--help"], capture_output=True,
                               text=True, cwd=work, env=env, timeout=120).stdout
    assert help_text.startswith("prune.py: ") and "pruner: demo, global_magnitude" in help_text
