"""Checkpoints: DeepSpeed's engine files + per-rank RNG + the SLoPe inference artifact,
sealed by a manifest, loaded safely.

Layout: <output_dir>/checkpoints/iter_XXXXXXXX/ holds DeepSpeed's model/optimizer files
(the kept values, masks and column masks are ordinary parameters and buffers, the layer
counters and adapter switch are module extra state), `rng_rank{r}.pt` for every rank,
`slope_model/` (the consolidated inference artifact, written by rank 0) and
`manifest.json` (size and sha256 of every other file, plus the run identity: model,
sparsity, adapters, data, layout, ZeRO stage, DP size under ZeRO 1-3).

Save protocol: leftovers of a save a kill interrupted are removed (a sealed checkpoint in
the way is renamed `.unloaded`, never deleted); everything is written (a failed write - a full
disk - removes the half-written directory and says so in one line);
every file is fsynced and hashed (the ranks share the work); rank 0 writes the manifest
atomically; only then is `checkpoints/latest` atomically replaced (temporary file, fsync,
rename, directory fsync). DeepSpeed is told not to write its own `latest`. A kill at any
moment therefore leaves `latest` naming a complete checkpoint. Old checkpoints are pruned
to the `train.keep_checkpoints` newest good ones, never the one `latest` names; one whose
files do not match its manifest's list and sizes does not count and is set aside.

Load protocol: the candidates are every sealed checkpoint and every one at or before the
one `latest` names, newest first; so a missing or dangling `latest` (found by scanning) and a
save killed between its manifest and `latest` lose nothing. The first candidate is verified
against its manifest (every
file present with its size and sha256, the run identity equal) before DeepSpeed reads a
byte. A file that is missing, truncated or changed makes us fall back to the newest older
checkpoint that verifies, with a warning naming the file (and `latest` is moved back to
it); the checkpoints passed over are set aside: renamed `iter_XXXXXXXX.corrupt` (kept for
inspection, never loaded, counted or pruned). If none verifies the run stops with a
CheckpointError listing the problems. A checkpoint of a different model/sparsity/layout
is refused with the differing keys.
DeepSpeed's own loader calls torch.load(weights_only=False); we replace it on our engine
with torch.load(weights_only=True) and an explicit allow-list of the few DeepSpeed
classes its files hold, so loading a checkpoint never executes pickled code.
"""
from __future__ import annotations

from .artifact import artifact_writer, consolidated_state_dict, sample_from_checkpoint
from .errors import CheckpointError
from .manifest import (MANIFEST, TAG_RE, check_identity, damage, tag_for, tags_newest_first,
                       verify, write_manifest)
from .rng import rng_state, set_rng_state
from .safe_load import safe_torch_load, use_safe_loading
from .store import (CORRUPT_SUFFIX, LATEST, UNLOADED_SUFFIX, candidates, choose, latest_tag,
                    load, prune, remove_unsealed_leftovers, save, saved_identity, set_aside,
                    use_errno_saving)

__all__ = ["CORRUPT_SUFFIX", "LATEST", "MANIFEST", "TAG_RE", "UNLOADED_SUFFIX",
           "CheckpointError", "artifact_writer", "candidates", "check_identity", "choose",
           "consolidated_state_dict", "damage", "latest_tag", "load", "prune",
           "remove_unsealed_leftovers", "rng_state", "safe_torch_load", "sample_from_checkpoint",
           "save", "saved_identity", "set_aside", "set_rng_state", "tag_for",
           "tags_newest_first", "use_errno_saving", "use_safe_loading", "verify",
           "write_manifest"]
