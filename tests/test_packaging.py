"""What Dataflow workers install (`--setup_file ./setup.py`): the sdist must carry every module the pipeline imports,
and `install_requires` must cover every third-party module it imports.

Beam builds the sdist exactly this way (`python setup.py sdist` in the project folder), no network needed.
"""

import fcntl
import importlib.metadata
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import imported_modules
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("yagg", "contracts", "parallel", "pipeline", "model", "inference", "train", "eval", "serve", "configs")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in FIRST_PARTY:
        return None
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _worker_imports() -> tuple[set[Path], set[str]]:
    """(project files, third-party top-level modules) reachable from the pipeline package's modules."""
    todo = sorted((ROOT / "pipeline").glob("*.py"))
    files: set[Path] = set()
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        for name in imported_modules(path, members=True):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                found = _module_file(name)
                if found is not None:
                    todo.append(found)
                todo.append(ROOT / top / "__init__.py")
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return files, third_party


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    # `setup.py sdist` stages its files in the source tree (yagg-0.1.0/, yagg.egg-info/), so two test workers building
    # at once collide there: a lock file in the run's shared temporary folder lets one build at a time.
    with open(tmp_path_factory.getbasetemp().parent / "sdist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=ROOT, check=True)
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = tar.getnames()
        requires = next(m for m in members if m.endswith(".egg-info/requires.txt"))
        requires_text = tar.extractfile(requires).read().decode()
    prefix = members[0].split("/")[0]
    return {m.removeprefix(prefix + "/") for m in members}, requires_text


def test_sdist_carries_every_module_a_worker_imports(sdist):
    members, _ = sdist
    files, _ = _worker_imports()
    # The walk reaches the text encoder (through the conditioning contract) and the decoder.
    assert ROOT / "model" / "clip" / "encoders.py" in files and ROOT / "pipeline" / "gif.py" in files
    missing = sorted(str(f.relative_to(ROOT)) for f in files if str(f.relative_to(ROOT)) not in members)
    assert not missing, f"the sdist lacks {missing}: add them to setup.py's packages"


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distributions installed to satisfy `requirements`, with their own dependencies (extras left out)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(requirement.name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
    return seen


def test_install_requires_covers_every_third_party_module_a_worker_imports(sdist):
    _, requires_text = sdist
    base = requires_text.split("\n[", 1)[0]  # the lines before the first [extra] section
    installed = _closure([Requirement(line) for line in base.splitlines() if line.strip()])
    _, modules = _worker_imports()
    providers = importlib.metadata.packages_distributions()
    uncovered = sorted(
        module for module in modules if not {canonicalize_name(d) for d in providers.get(module, [])} & installed
    )
    assert not uncovered, f"workers import {uncovered}, which no install_requires entry provides"
