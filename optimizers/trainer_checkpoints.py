"""The checkpoints a TRL trainer leaves (``<folder>/checkpoint-N``), without importing the trainer.

GRPO and SFT resume from the newest complete one; ``apexdsp run --check`` reports it.

transformers writes a checkpoint's files in place, ``trainer_state.json`` last (opened, then written), so a
process killed while saving leaves a folder whose state file is missing, empty or cut off. Such a folder
is not a checkpoint: resuming from it would fail, and the one before it is still whole.

A stage that resumes passes the digest of its settings (``trained_lm.settings_digest``); it is recorded
beside the checkpoints, and checkpoints recorded under another digest are removed rather than resumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# The model files transformers and PEFT save in a checkpoint (a sharded model has its index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
SETTINGS_FILE = "apexdsp-settings.json"


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds weights and a trainer state that parses (the file written last)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and any((checkpoint / name).is_file() for name in WEIGHT_FILES)


def last_checkpoint(folder: Path, digest: str | None = None) -> Path | None:
    """The newest complete ``checkpoint-N`` folder (see :func:`is_complete`), if any.

    With ``digest`` (a stage about to train into ``folder``): checkpoints saved under another digest are
    removed first, and ``digest`` is recorded for the checkpoints to come."""
    if digest is not None:
        _keep_only_checkpoints_of(folder, digest)
    if not folder.is_dir():
        return None
    found = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*")
                   if p.name.split("-")[-1].isdigit())
    return next((path for _, path in reversed(found) if is_complete(path)), None)


def _keep_only_checkpoints_of(folder: Path, digest: str) -> None:
    try:
        recorded = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))["settings_digest"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None  # none recorded (a new folder, or checkpoints saved before digests were recorded)
    if recorded == digest:
        return
    if recorded is not None:
        logger.warning("checkpoints in %s were saved with other settings (digest %s, now %s): training from "
                       "the start", folder, recorded, digest)
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{SETTINGS_FILE}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as handle:
        json.dump({"settings_digest": digest}, handle)
    os.replace(handle.name, folder / SETTINGS_FILE)


__all__ = ["SETTINGS_FILE", "WEIGHT_FILES", "is_complete", "last_checkpoint"]
