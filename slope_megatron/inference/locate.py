"""Find the inference artifact behind whatever directory a user points at.

Users pass `--checkpoint` the thing they have at hand: the artifact itself, one checkpoint
directory (`iter_00001000/`, holding `slope_model/`), or a whole run's output_dir (holding
`checkpoints/iter_*/`). For a run we take the newest iteration whose artifact is complete;
the trainer writes `slope_model/` atomically, so a complete artifact is one whose manifest
exists (an iteration still being written has none yet and is skipped). Checksums are verified
later by `load_artifact`; a corrupt newest artifact is an error, not a silent fallback to an
older model.
"""
from __future__ import annotations

import re
from pathlib import Path

from .artifact import MANIFEST, ArtifactError

ARTIFACT_SUBDIR = "slope_model"
CHECKPOINTS_SUBDIR = "checkpoints"
_ITER = re.compile(r"^iter_(\d+)$")


def _is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def find_artifact(path: Path) -> Path:
    """Return the artifact directory for an artifact, checkpoint or run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"checkpoint path '{path}' is not a directory")
    if _is_artifact(path):
        return path
    if (path / ARTIFACT_SUBDIR).is_dir():
        if not _is_artifact(path / ARTIFACT_SUBDIR):
            raise ArtifactError(f"'{path / ARTIFACT_SUBDIR}' has no {MANIFEST}: the artifact is "
                                "incomplete (interrupted save?)")
        return path / ARTIFACT_SUBDIR
    ckpts = path / CHECKPOINTS_SUBDIR
    if ckpts.is_dir():
        iters = sorted(((int(m.group(1)), d) for d in ckpts.iterdir()
                        if d.is_dir() and (m := _ITER.match(d.name))), reverse=True)
        for _, d in iters:
            if _is_artifact(d / ARTIFACT_SUBDIR):
                return d / ARTIFACT_SUBDIR
        raise ArtifactError(f"no complete '{ARTIFACT_SUBDIR}/' under any of the {len(iters)} "
                            f"iter_* directories in '{ckpts}'")
    raise ArtifactError(f"'{path}' is neither an artifact (no {MANIFEST}), a checkpoint (no "
                        f"{ARTIFACT_SUBDIR}/) nor a run directory (no {CHECKPOINTS_SUBDIR}/)")
