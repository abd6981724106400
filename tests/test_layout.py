"""The architecture as the README's layout table states it: what each subpackage may import."""

import subprocess
import sys
import typing

import pytest

from ltrp.core import options
from ltrp.core.losses import LOSSES
from ltrp.core.mae import GEOMETRIES
from ltrp.core.ranker import RANKER_GEOMETRIES

HEAVY = ("ray", "mlflow")


def _imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after `statement`, in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_only_the_pipeline_imports_ray_or_mlflow() -> None:
    """Every module of core, data and evaluation, imported in one fresh interpreter, leaves Ray and
    MLflow out (one interpreter for all three: each start costs seconds)."""
    code = (
        "import importlib, pkgutil, ltrp.core, ltrp.data, ltrp.evaluation; "
        "[importlib.import_module(m.name) for p in (ltrp.core, ltrp.data, ltrp.evaluation) "
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]"
    )
    loaded = _imported_after(code)
    assert {"ltrp", "torch", "pyarrow", "scipy"} <= loaded  # the probe sees what was imported
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_import_ltrp_and_the_configs_load_nothing_heavy() -> None:
    """`import ltrp` exports lazily; the launchers' configs parse without torch, Ray or MLflow."""
    assert not _imported_after("import ltrp") & {"torch", *HEAVY}
    assert not _imported_after("import ltrp.pipeline.configs, jobs._cli") & {"torch", *HEAVY}
    assert "torch" in _imported_after("import ltrp; ltrp.MAE")  # the export still resolves


@pytest.mark.parametrize(
    ("choices", "registry"),
    [(options.MAEGeometry, GEOMETRIES), (options.RankerGeometry, RANKER_GEOMETRIES), (options.Loss, LOSSES)],
    ids=["mae-geometries", "ranker-geometries", "losses"],
)
def test_choice_names_are_the_registries_names(choices: object, registry: dict) -> None:
    assert set(typing.get_args(choices)) == set(registry)
