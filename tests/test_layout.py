"""The architecture as docs/layout.md's table states it: what each subpackage may import."""

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ltrp.core import options
from ltrp.core.losses import LOSSES
from ltrp.core.mae import GEOMETRIES
from ltrp.core.ranker import RANKER_GEOMETRIES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "mlflow")
#: The subpackages in the table's order: each may import what its row names and what the rows above
#: it do ("+ ..."), and the subpackages up to itself.
LAYERS = ("core", "data", "evaluation", "pipeline")
#: The table names libraries as installed; a few import under another name.
IMPORT_NAMES = {"scikit-image": "skimage"}


def _allowed() -> dict[str, set[str]]:
    """Per subpackage, the top-level packages its row of docs/layout.md's table allows, with the rows
    above it: `| `ltrp/data/` | ... | + numpy, PIL, ... |`."""
    text = (ROOT / "docs" / "layout.md").read_text()
    allowed: dict[str, set[str]] = {}
    above: set[str] = set()
    for layer in LAYERS:
        row = re.search(rf"^\| `ltrp/{layer}/` \|.*\| ([^|]*) \|$", text, re.MULTILINE)
        assert row, f"docs/layout.md: no table row for ltrp/{layer}/"
        names = {n.strip() for n in row[1].removeprefix("+").split(",") if n.strip()}
        above |= {IMPORT_NAMES.get(n, n) for n in names}
        allowed[layer] = set(above)
    return allowed


def _imports(layer: str) -> dict[str, set[str]]:
    """Every absolute import of ltrp/LAYER's modules, wherever it stands (a function's lazy import
    included): top-level package (`ltrp.SUBPACKAGE` for the library's own) -> the files importing it.
    The standard library's are left out."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "ltrp" / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from ltrp import data` imports the subpackage `ltrp.data`
                bare = node.module == "ltrp"
                names = [f"ltrp.{alias.name}" for alias in node.names] if bare else [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] not in sys.stdlib_module_names:
                    key = ".".join(parts[:2]) if parts[0] == "ltrp" else parts[0]
                    found.setdefault(key, set()).add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_subpackage_imports_only_what_its_row_allows(layer: str) -> None:
    """Every import statement of the subpackage against the table: third-party packages its row (or a
    row above) names, and the library's subpackages up to itself. What those packages import in turn
    is theirs (torch loads numpy, pyarrow.dataset pandas)."""
    up_to = LAYERS[: LAYERS.index(layer) + 1]
    table = _allowed()[layer]
    own = {f"ltrp.{lay}" for lay in up_to}
    outside = {k: sorted(v) for k, v in _imports(layer).items() if k not in table | own}
    assert not outside, f"ltrp/{layer}/ imports what docs/layout.md's row does not allow: {outside}"


def _imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after `statement`, in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_only_the_pipeline_loads_ray_or_mlflow() -> None:
    """Every module of core, data and evaluation, imported in one fresh interpreter, leaves Ray and
    MLflow out, even as what another library loads (one interpreter for all three: each start costs
    seconds)."""
    code = (
        "import importlib, pkgutil, ltrp.core, ltrp.data, ltrp.evaluation; "
        "[importlib.import_module(m.name) for p in (ltrp.core, ltrp.data, ltrp.evaluation) "
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]"
    )
    loaded = _imported_after(code)
    assert {"ltrp", "torch", "pyarrow", "scipy"} <= loaded  # the probe sees what was imported
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_import_ltrp_the_configs_and_the_local_services_load_nothing_heavy() -> None:
    """`import ltrp` exports lazily; the launchers' configs parse, and the tests' and benchmarks' local
    services (`ltrp.local`) start, without torch, Ray or MLflow."""
    assert not _imported_after("import ltrp") & {"torch", *HEAVY}
    assert not _imported_after("import ltrp.pipeline.configs, jobs._cli") & {"torch", *HEAVY}
    assert not _imported_after("import ltrp.local") & {"torch", *HEAVY}
    assert "torch" in _imported_after("import ltrp; ltrp.MAE")  # the export still resolves


#: What only drivers and users install (pyproject.toml's `full` extra), by import name; mlflow's server
#: side (sqlalchemy, alembic, flask) with them. Workers get the base dependencies only.
DRIVER_ONLY = ("scipy", "skimage", "matplotlib", "sklearn", "sqlalchemy", "alembic", "flask")
#: Every module a Ray worker imports to run a stage or a training loop (the stages' classes, the tasks
#: pickled to Ray Train's workers).
WORKER_MODULES = (
    "ltrp.pipeline.score_stages", "ltrp.pipeline.rank_stages", "ltrp.pipeline.train_job",
    "ltrp.pipeline.pretrain_job", "ltrp.pipeline.trainer", "ltrp.pipeline.training_data",
)  # fmt: skip


def test_the_worker_stages_import_without_the_driver_only_packages(tmp_path: Path) -> None:
    """A worker image installs `pip install ltrp` only: every worker module imports in an interpreter
    where importing any of the `full` extra's packages fails (each shadowed by a package that raises
    ModuleNotFoundError, as an absent one does), and loads none of them."""
    for name in DRIVER_ONLY:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ModuleNotFoundError('no {name} in a worker')")
    imports = "; ".join(f"import {m}" for m in WORKER_MODULES)
    loaded = _imported_after(f"sys.path.insert(0, {str(tmp_path)!r}); {imports}")
    assert {"ltrp", "torch", "ray", "mlflow"} <= loaded  # the probe sees what was imported
    assert not loaded & set(DRIVER_ONLY), loaded & set(DRIVER_ONLY)


@pytest.mark.parametrize(
    ("choices", "registry"),
    [(options.MAEGeometry, GEOMETRIES), (options.RankerGeometry, RANKER_GEOMETRIES), (options.Loss, LOSSES)],
    ids=["mae-geometries", "ranker-geometries", "losses"],
)
def test_choice_names_are_the_registries_names(choices: object, registry: dict) -> None:
    assert set(typing.get_args(choices)) == set(registry)
