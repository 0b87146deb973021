"""Finished confirmations kept on disk, so an interrupted `discover` resumes at the next finding.

Confirmation is classifier forwards: about 8 passes over 500 clean images per finding
(`spurfast.confirm`), half of a rerun of `make demo` (11 of 23 s) and minutes per finding for
a ResNet-18 on a CPU (4,000 forwards at 32-39 img/s on 2 cores).  An interruption lost every
finding confirmed so far.  Each finding's result is saved as it finishes, under a key that
hashes what it depends on: the model and the image source (`spurfast.identity.fingerprint`,
and `content_digest` of what it holds), how the source's images are read, the settings, and
the finding's class, pattern and drawn images (clean and class-content indices).  A changed input finds no file of its key and is
computed afresh; files of other keys are left alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .atomic_files import replace_atomically
from .data.sources import content_digest
from .discovery_work import sweep_killed_writers, work_key
from .identity import fingerprint

VERSION = 3   # bump when what `confirm_pattern` computes changes: results kept by older code are then not read
# 2: an unreadable clean image is replaced (version 1 confirmed on fewer images under the same key)
# 3: a model that gives channels-last images the same logits classifies them so (probabilities ~1e-6 apart)


class KeptConfirmations:
    """``folder/KEY.json``: one finding's `confirm_pattern` result per file, written atomically.
    ``source``: where the clean and class images are read (the pool as the run reads it, or
    the clean set); ``config``: the `ConfirmConfig`; ``content``: `content_digest` of what the
    source holds where the caller has made it (one stat per file of a folder: not twice a run)."""

    def __init__(self, folder, model: torch.nn.Module, source, config, content: str | None = None):
        self.folder = Path(folder)
        # the decoder matters too: DALI and PIL decode a JPEG to pixels up to 1/255 apart
        reads = [type(source).__name__, getattr(source, "loader_backend", None), getattr(source, "device", None)]
        # how many findings run at once changes no result: a run resumed with another number reads them
        settings = {k: v for k, v in asdict(config).items() if k != "at_once"}
        # and what the source holds: the fingerprint samples three items' ids, so a clean set
        # of other images under the same names (a rerun with --overwrite keeps this folder)
        # read the first set's confirmations
        self._settings = {"piece": "confirmation", "confirm_version": VERSION, "config": settings,
                          "reads": reads, "model_and_source": fingerprint(source, model),
                          "content": content or content_digest(source)}
        sweep_killed_writers(self.folder, "*.json.*.tmp")

    def key(self, finding: dict, clean_idx: np.ndarray, class_idx: np.ndarray) -> str:
        """`discovery_work.work_key` of the finding's class, pattern and drawn images, under this run's settings."""
        arrays = {"mask": finding["_mask"], "contrast": finding["_contrast"], "pattern": finding.get("_pattern"),
                  "clean": clean_idx, "class": class_idx}
        arrays = {name: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                  for name, a in arrays.items() if a is not None}
        return work_key(arrays, {**self._settings, "class": int(finding["class"])})

    def _path(self, finding: dict, clean_idx: np.ndarray, class_idx: np.ndarray) -> Path:
        return self.folder / f"{self.key(finding, clean_idx, class_idx)}.json"

    def lookup(self, finding: dict, clean_idx: np.ndarray, class_idx: np.ndarray) -> dict | None:
        """The kept result of this finding on these images, or None."""
        try:
            got = json.loads(self._path(finding, clean_idx, class_idx).read_text())
        except (OSError, ValueError):   # none yet, or damaged: computed again
            return None
        return got if isinstance(got, dict) and "flip_rate" in got else None

    def keep(self, finding: dict, clean_idx: np.ndarray, class_idx: np.ndarray, got: dict) -> None:
        """Save ``got``, the result of this finding on these images."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # numpy scalars as Python ones (np.int64 is no JSON number); floats round-trip exactly
        replace_atomically(self._path(finding, clean_idx, class_idx),
                           lambda fh: json.dump(got, fh, default=lambda v: v.item()))
