"""Write a corpus of multi-object scenes (Fashion-MNIST objects on mixed backgrounds) with known masks.

    python -m jobs.scenes --output data/scenes/train --split train --count 20000
    python -m jobs.scenes --output data/scenes/test --split test --count 1000 --backgrounds photo

Writes OUTPUT/images/NNNNNN.png and OUTPUT/manifest.parquet (docs/scenes.md): give the manifest to
python -m jobs.score or jobs.pretrain_mae as --source. A scene is a pure function of the settings, the
split and its index, so writing again gives the same files.
"""

from __future__ import annotations

from pathlib import Path

from jobs._cli import parse
from ltrp.pipeline.configs import ScenesConfig

PROG = "python -m jobs.scenes"


def main(argv: list[str] | None = None) -> str:
    cfg = parse(ScenesConfig, "scenes", argv, prog=PROG)
    from ltrp.data.scenes import write_scenes  # after parsing: --help and refusals stay fast

    manifest = write_scenes(Path(cfg.output), cfg.split, cfg.count, cfg.scene())
    print(f"wrote {cfg.count} {cfg.split} scenes: {manifest}")
    return str(manifest)


if __name__ == "__main__":
    main()
