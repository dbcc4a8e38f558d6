"""Every command in README.md and data/README.md is checked: `python train.py` / `python prune.py` /
`nvit-*` lines compose with the real configs (a sweep's first value of each list), profiler lines
parse, and the README's Python snippet runs on a saved model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from nvit_lightning.app import setup_environment
from nvit_lightning.models import PrunableViT, ViTDims

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "data" / "README.md"]
ENTRY_POINTS = {"train.py": "train", "prune.py": "prune", "nvit-train": "train", "nvit-prune": "prune"}
setup_environment()


def shell_commands(path: Path) -> list[str]:
    """The commands of a markdown file's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def commands(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc):
            words = shlex.split(command)
            if kind == "hydra" and (words[0] in ENTRY_POINTS or words[:2][-1] in ENTRY_POINTS):
                found.append((doc.name, command))
            if kind == "profiler" and words[:3] == ["python", "-m", "nvit_lightning.latency.profiler"]:
                found.append((doc.name, command))
    return found


def test_the_readmes_have_commands_to_check() -> None:
    assert len(commands("hydra")) >= 12 and len(commands("profiler")) >= 3


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """`key=a,b` -> `key=a`: what the first job of the sweep composes."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else o.input_line for o in parsed]


@pytest.mark.parametrize("doc,command", commands("hydra"), ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_readme_command_composes(doc: str, command: str, tmp_path: Path) -> None:
    words = [w.replace("<run>", "run").replace("<dir>", str(tmp_path)) for w in shlex.split(command)]
    script = next(w for w in words if w in ENTRY_POINTS)
    overrides = [w for w in words[words.index(script) + 1:] if w not in ("-m", "--multirun")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(ENTRY_POINTS[script], overrides=first_of_each_sweep(overrides), return_hydra_config=True)
    assert cfg.task_name == ENTRY_POINTS[script]
    choices = cfg.hydra.runtime.choices
    for override in OverridesParser.create().parse_overrides(first_of_each_sweep(overrides)):
        key, value = override.key_or_group, override.value()
        if key in choices:  # a config group: the option it chose
            assert choices[key] == value, override.input_line
        elif not key.startswith("hydra") and override.type.name == "CHANGE" and not isinstance(value, list | dict):
            assert _select(cfg, key) == value, override.input_line


def _select(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("doc,command", commands("profiler"), ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_readme_profiler_command_parses(doc: str, command: str) -> None:
    from nvit_lightning.latency.profiler import _parser

    args = _parser().parse_args(shlex.split(command)[3:])
    assert args.command in ("profile", "check")


def test_readme_python_snippet_runs_on_a_saved_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    model = PrunableViT(ViTDims.uniform(32, 2, 2), img_size=32, patch_size=8, num_classes=5, masked=False)
    model.save_pretrained(tmp_path / "outputs" / "prune" / "run" / "model")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet.replace("<run>", "run"), scope)
    loaded = scope["model"]
    assert loaded.num_classes == 10 and scope["cfg"]["input_size"] == (3, 32, 32)
    assert PrunableViT.from_pretrained(tmp_path / "my_model").num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.forward_features(x), model.eval().forward_features(x))
