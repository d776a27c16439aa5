"""The dependency rules between yagg's folders, checked on every import statement (lazy ones inside functions too).

    model/      networks, CLIP, diffusion maths: knows no data, mesh or job
    contracts/  what crosses between stages: may use model (CLIP for conditioning), nothing downstream
    parallel/   devices and meshes: knows no model, data or job
    pipeline/   raw GIFs -> records: contracts and model, never train, eval, inference or serve
    inference/  parameters -> clips: contracts, model, parallel
    train/      may use inference (its periodic samples), never eval or serve
    eval/       contracts, inference, parallel, model and the demo data's definitions in pipeline; never train
    serve/      contracts, inference, parallel, model; never train or eval
    yagg/       config.py is used by everyone and uses nothing; cli.py dispatches to every command
Data and models flow one way: pipeline writes records, train reads them and writes checkpoints, eval, export and the
server read checkpoints or exported models, all through contracts/.
"""

import shutil
from pathlib import Path

from conftest import imported_modules

ROOT = Path(__file__).resolve().parents[1]
BASE = {"yagg", "configs"}  # yagg.config and the config files, which every stage reads
ALLOWED = {
    "model": {"model"},
    "contracts": {"contracts", "model"},
    "parallel": {"parallel"},
    "pipeline": {"pipeline", "contracts", "model"},
    "inference": {"inference", "contracts", "model", "parallel"},
    "train": {"train", "inference", "contracts", "model", "parallel"},
    "eval": {"eval", "inference", "contracts", "model", "parallel", "pipeline"},
    "serve": {"serve", "inference", "contracts", "model", "parallel"},
    "configs": {"configs"},
    "yagg": set(),
}
# The command line dispatches to every stage's command; nothing imports it.
TOP = {"yagg.cli", "yagg.__main__"}


def _first_party_imports(path: Path) -> set[str]:
    return {name for name in imported_modules(path) if name.split(".")[0] in ALLOWED}


def violations(root: Path) -> list[str]:
    """Every import in `root`'s packages that breaks the rules, as "file: imports module"."""
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            if module in TOP:
                continue
            for name in sorted(_first_party_imports(path)):
                if name in TOP or name.split(".")[0] not in allowed | BASE:
                    found.append(f"{path.relative_to(root)}: imports {name}")
    return found


def test_every_folder_imports_only_what_the_rules_allow():
    assert violations(ROOT) == []


def test_the_check_catches_a_forbidden_import(tmp_path):
    for package in ALLOWED:
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "model" / "leak.py").write_text("def f():\n    from train import loop\n")
    (tmp_path / "eval" / "leak.py").write_text("import train.state\n")
    (tmp_path / "pipeline" / "leak.py").write_text("from yagg.cli import main\n")
    assert violations(tmp_path) == [
        "model/leak.py: imports train",
        "pipeline/leak.py: imports yagg.cli",
        "eval/leak.py: imports train.state",
    ]
