"""Every command and code block of README.md and docs/*.md, as written.

A fenced block is ```bash or ```python (code: run in `make test-docs`), or ```text (what a command
printed: not run). A code block that needs a cluster, real S3, a GPU or more than a few minutes carries
`<!-- check-only: why -->` on the line before it: it is not run, but its syntax is checked (`bash -n`,
`compile`), as is every `python -m jobs.X --flag` of every block, against the options the job's config
dataclass declares (read from the source, so this costs no imports). Those checks, the links and the
LICENSE run in `make test` (about a second).

`make test-docs` (marker `docs`) runs every other block, in the order the files show them, in one
folder laid out as after `make demo`: a tiny run of `python -m jobs.pipeline` (60 training and 12 test
scenes, 2 views, 1 epoch) under `runs/pipeline/`, MLflow at its default `sqlite:///mlflow.db` there, no
RAY_ADDRESS (each job starts its own local Ray, as on a laptop), and `.venv`, `jobs/`, `ltrp/`, `cluster/`
linked from the checkout. A block that drifts from the code fails here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
CODE = ("bash", "python")  # run (or checked, when check-only)
OUTPUT = ("text",)  # printed output: never run
FENCE = re.compile(r"^```(\S*)\s*$")
CHECK_ONLY = re.compile(r"^<!--\s*check-only:\s*(\S.*?)\s*-->$")
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: What the sandbox links from the checkout, so that the blocks' relative paths are the README's.
LINKED = ("jobs", "ltrp", "cluster", "docs", "Makefile", "pyproject.toml", "requirements")
BLOCK_TIMEOUT_S = 420


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    check_only: str | None  # the reason, when the block is only checked

    @property
    def id(self) -> str:
        """README.md:123, as pytest shows it."""
        return f"{self.file.relative_to(REPO)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path`, with the check-only marker on the last non-blank line before it."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = CHECK_ONLY.match(before)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a fence that is never closed"
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 1, match.group(1), code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.lang in CODE and b.check_only is None]
CHECKED_BLOCKS = [b for b in ALL_BLOCKS if b.lang in CODE and b.check_only is not None]


def job_commands(code: str) -> Iterator[tuple[str, list[str]]]:
    """(module, its --flags) for every `python -m jobs...` of a shell block, continuation lines joined
    and comments dropped; a command ends at the line's end or at `&&`, `||`, `;`, `|`, `&`."""
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        try:
            tokens = shlex.split(line, posix=True)
        except ValueError:
            tokens = line.split()
        for i, token in enumerate(tokens[:-1]):
            if token == "-m" and tokens[i + 1].startswith("jobs."):
                flags = []
                for arg in tokens[i + 2 :]:
                    if arg in ("&&", "||", ";", "|", "&") or arg.endswith(";"):
                        break
                    if arg.startswith("--"):
                        flags.append(arg.split("=", 1)[0])
                yield tokens[i + 1], flags


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    """The classes a source file defines, by name."""
    return {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}


def _fields(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> dict[str, str]:
    """A dataclass's fields (its bases' first) and their annotations, as source text."""
    fields: dict[str, str] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields |= _fields(classes[base.id], classes)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            fields[node.target.id] = ast.unparse(node.annotation)
    return fields


def known_flags(module: str) -> set[str]:
    """The flags `python -m MODULE` accepts, read from its source: the fields of the dataclass it hands
    to `parse` or `tyro.cli` (here or in ltrp/pipeline/configs.py) as tyro spells them (`--no-x` for a
    bool), `--config`, `--help`, and any "--flag" string the launcher handles itself (`--demo`)."""
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.exists(), f"python -m {module}: no such module ({path})"
    tree = ast.parse(path.read_text())
    classes = _classes(path) | _classes(REPO / "ltrp" / "pipeline" / "configs.py")
    flags, found = {"--help", "--config"}, False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in ("parse", "cli") and node.args[0].id in classes:
                found = True
                for field, annotation in _fields(classes[node.args[0].id], classes).items():
                    flags.add("--" + field.replace("_", "-"))
                    if annotation == "bool":
                        flags.add("--no-" + field.replace("_", "-"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
            flags.add(node.value)
    assert found, f"python -m {module}: found no options dataclass in {path.name}"
    return flags


# ---------------------------------------------------------------------------------------------------
# The cheap checks: `make test`.


def test_every_block_is_run_or_marked_check_only() -> None:
    """Nothing is skipped silently: each block is code that runs, code marked check-only with a reason,
    or printed output; and the examples that run are most of them."""
    others = [f"{b.id} ```{b.lang}" for b in ALL_BLOCKS if b.lang not in CODE + OUTPUT]
    assert not others, f"blocks neither {CODE} nor {OUTPUT}: {others}"
    misplaced = [b.id for b in ALL_BLOCKS if b.lang in OUTPUT and b.check_only is not None]
    assert not misplaced, f"check-only marks output, which never runs: {misplaced}"
    readme_runs = [b for b in RUN_BLOCKS if b.file.name == "README.md"]
    assert len(RUN_BLOCKS) >= 10 and len(readme_runs) >= 8, [b.id for b in RUN_BLOCKS]
    print(f"{len(RUN_BLOCKS)} blocks run, {len(CHECKED_BLOCKS)} check-only:")
    for b in CHECKED_BLOCKS:
        print(f"  {b.id}: {b.check_only}")


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in CODE], ids=lambda b: b.id)
def test_block_syntax_and_flags(block: Block) -> None:
    """Every code block parses, and every `python -m jobs.X --flag` names an option the job has."""
    if block.lang == "python":
        compile(block.code, block.id, "exec")
    else:
        done = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert done.returncode == 0, f"{block.id}: bash -n: {done.stderr}"
        for module, flags in job_commands(block.code):
            unknown = sorted(set(flags) - known_flags(module))
            assert not unknown, f"{block.id}: python -m {module} has no option {unknown}"


def test_job_commands_are_found() -> None:
    """The flag check sees commands through continuation lines, comments and `ray job submit --`."""
    code = (
        "ray job submit --working-dir . -- \\\n    python -m jobs.score --source s3://b/ --flip \\\n"
        "    --views 4  # four views\n.venv/bin/python -m jobs.promote --model m --dry-run || echo $?\n"
    )
    assert list(job_commands(code)) == [
        ("jobs.score", ["--source", "--flip", "--views"]),
        ("jobs.promote", ["--model", "--dry-run"]),
    ]
    assert {"--flip", "--no-flip", "--views", "--demo"} <= known_flags("jobs.score")
    assert "--file-shards-typo" not in known_flags("jobs.score")


def test_relative_links_exist() -> None:
    """Every relative link of README.md and docs/*.md names a file of the checkout."""
    missing = []
    for path in DOC_FILES:
        for target in LINK.findall(path.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            if not (path.parent / target.split("#", 1)[0]).exists():
                missing.append(f"{path.relative_to(REPO)}: {target}")
    assert not missing, missing


def test_license_is_the_one_pyproject_declares() -> None:
    """pyproject.toml declares Apache-2.0, and LICENSE is that licence's text."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190


# ---------------------------------------------------------------------------------------------------
# The examples, run: `make test-docs`.


def tiny_pipeline_config() -> dict:
    """jobs/pipeline.yaml, shrunk (its own keys, so a drift breaks this) and otherwise the demo's: root
    runs/pipeline, the registered model models:/ltrp-scenes."""
    spec = yaml.safe_load((REPO / "jobs" / "pipeline.yaml").read_text())
    spec["data"].update(train_images=60, test_images=12)
    spec["score"].update(views=2, shard_size=40)
    spec["train"].update(epochs=1)
    spec["evaluate"].update(max_train=40, probe_seeds=1, probe_epochs=1, supervised_epochs=1, resamples=50)
    return spec


def sandbox_env() -> dict[str, str]:
    """The environment of a newcomer's shell: no MLflow server, no Ray cluster, no S3 settings."""
    drop = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as after `make demo`, at a tiny size: the checkout's code linked in, the tiny pipeline
    run under runs/pipeline, its MLflow registry in mlflow.db."""
    folder = tmp_path_factory.mktemp("demo")
    (folder / ".venv").symlink_to(sys.prefix)
    for name in LINKED:
        (folder / name).symlink_to(REPO / name)
    (folder / "tiny-pipeline.yaml").write_text(yaml.safe_dump(tiny_pipeline_config()))
    done = subprocess.run(
        [".venv/bin/python", "-m", "jobs.pipeline", "--config", "tiny-pipeline.yaml"],
        cwd=folder,
        env=sandbox_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    (folder / "pipeline.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "[pipeline] done in" in done.stdout
    return folder


@pytest.mark.docs
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_block_runs(block: Block, demo_folder: Path) -> None:
    """The block, as written, in the demo folder (the blocks before it have run there, in order)."""
    argv = ["bash", "-euo", "pipefail", "-c"] if block.lang == "bash" else [".venv/bin/python", "-c"]
    done = subprocess.run(
        [*argv, block.code],
        cwd=demo_folder,
        env=sandbox_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    print(output[-3000:])
    assert done.returncode == 0, f"{block.id} exited with {done.returncode}:\n{block.code}\n{output[-4000:]}"
