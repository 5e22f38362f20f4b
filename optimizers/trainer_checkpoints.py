"""The checkpoints a TRL trainer leaves (``<folder>/checkpoint-N``), without importing the trainer.

GRPO and SFT resume from the newest complete one; ``apexdsp run --check`` reports it.
"""

from __future__ import annotations

from pathlib import Path


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder (one with trainer state), if any."""
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


__all__ = ["last_checkpoint"]
