"""Rater decisions, persisted as a BIDS derivatives dataset before a request is acknowledged.

Per unit the decisions table (one row per lesion and rater: the latest call) is the record; the
``desc-rim_dseg`` image is derived from it (the majority of all raters) and rewritten after every
change. Each change is one read-modify-write of the table under an exclusive file lock on the
review dataset (so two tabs, or two servers of two raters, never interleave), written atomically
(temporary file + rename) and flushed to disk; a server killed after answering has the decision
on disk. When a server died between the table and the image, the next start rebuilds the image.
"""
from __future__ import annotations

import fcntl
import logging
import threading
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np
import pandas as pd

from .. import derivatives as drv
from ..lesions import RIM_NEGATIVE, RIM_POSITIVE
from .catalog import Catalog, ReviewUnit

LOGGER = logging.getLogger("qsmrim.review")
DECISIONS = ("rimpos", "rimneg", "unsure")
COLUMNS = ["lesion_id", "decision", "rater", "time", "probability"]
LOCK_NAME = ".qsmrim-review.lock"


def majority(decisions: Iterable[str]) -> int:
    """The dseg value of one lesion from its raters' decisions.

    The most frequent decision wins when it is rim+ (2) or rim- (1); unsure, a tie (one rater each
    way, or as many unsure as either) and no decision give 0, which training leaves out.
    """
    counts = Counter(d for d in decisions if d in DECISIONS).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return 0
    return {"rimpos": RIM_POSITIVE, "rimneg": RIM_NEGATIVE}.get(counts[0][0], 0)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class DecisionStore:
    """Reads and writes the review dataset of one output directory."""

    def __init__(self, review_dir: Path, output_dir: Path, catalog: Catalog, container: str | None = None) -> None:
        self.review_dir = Path(review_dir)
        self.output_dir = Path(output_dir)
        self.catalog = catalog
        self._thread_lock = threading.Lock()
        self._cache: dict[drv.Unit, tuple[int, pd.DataFrame]] = {}
        drv.init_review_dir(self.review_dir, self.output_dir, container)

    # -- reading -----------------------------------------------------------------------------
    def table(self, unit: drv.Unit) -> pd.DataFrame:
        """The unit's decisions (all raters), re-read when another process changed the file."""
        path = drv.review_path(self.review_dir, unit, "rim_decisions")
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return pd.DataFrame(columns=COLUMNS)
        cached = self._cache.get(unit)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        table = drv.read_tsv(path).reindex(columns=COLUMNS)
        table["lesion_id"] = table["lesion_id"].astype(int)
        table["rater"] = table["rater"].astype(str)
        self._cache[unit] = (stamp, table)
        return table

    def decisions(self, unit: drv.Unit) -> dict[int, dict[str, str]]:
        """lesion_id -> {rater: decision}."""
        out: dict[int, dict[str, str]] = {}
        for row in self.table(unit).itertuples(index=False):
            out.setdefault(int(row.lesion_id), {})[str(row.rater)] = str(row.decision)
        return out

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.review_dir.mkdir(parents=True, exist_ok=True)
            with open(self.review_dir / LOCK_NAME, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def decide(self, unit: ReviewUnit, lesion_id: int, rater: str, decision: str | None,
               probability: float) -> dict[str, str]:
        """Record (or with None clear) one rater's decision; returns the lesion's decisions after it."""
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS} or null")
        with self._locked():
            self._cache.pop(unit.unit, None)  # read what is on disk now, not what we saw before the lock
            table = self.table(unit.unit)
            keep = ~((table["lesion_id"] == lesion_id) & (table["rater"] == rater))
            table = table[keep]
            if decision is not None:
                row = pd.DataFrame([{"lesion_id": int(lesion_id), "decision": decision, "rater": rater,
                                     "time": utc_now(), "probability": float(probability)}])
                table = row if table.empty else pd.concat([table, row], ignore_index=True)
            table = table.sort_values(["lesion_id", "rater"]).reset_index(drop=True)
            self._write(unit, table)
        return self.decisions(unit.unit).get(int(lesion_id), {})

    def _write(self, unit: ReviewUnit, table: pd.DataFrame) -> None:
        path = drv.review_path(self.review_dir, unit.unit, "rim_decisions")
        drv.write_tsv(path, table[COLUMNS], fsync=True)
        drv.write_json(drv.sidecar_path(path), {
            "Description": "Rater decisions made in qsmrim-review, one row per lesion and rater (the latest)",
            "Sources": [self._uri(unit.lesions_dseg), self._uri(unit.rim_table)],
            **drv.DECISIONS_DICTIONARY})
        self._write_dseg(unit, table)

    def _uri(self, path: Path) -> str:
        return "bids:qsmrim:" + Path(path).resolve().relative_to(self.output_dir.resolve()).as_posix()

    def _write_dseg(self, unit: ReviewUnit, table: pd.DataFrame) -> None:
        image = nib.load(str(unit.lesions_dseg))
        lesions = np.asarray(image.dataobj).astype(np.int64)
        lookup = np.zeros(int(lesions.max(initial=0)) + 1, dtype=np.uint8)
        for lesion_id, rows in table.groupby("lesion_id"):
            if 0 < int(lesion_id) < lookup.size:
                lookup[int(lesion_id)] = majority(rows["decision"])
        path = drv.review_path(self.review_dir, unit.unit, "rim_dseg")
        drv.write_nifti(path, lookup[lesions], image.affine, dtype=np.uint8, fsync=True)
        raters = sorted(set(table["rater"]))
        drv.write_json(drv.sidecar_path(path), {
            "Description": "Rim annotation from qsmrim-review: the majority of all raters' decisions per lesion "
                           "(1 rim-, 2 rim+; 0 background, not reviewed, unsure or raters tied)",
            "Sources": [self._uri(unit.lesions_dseg), Path(unit.model_dir).resolve().as_uri()],
            "SpatialReference": self._uri(unit.lesions_dseg),
            "ModelID": unit.model_id,
            "Raters": raters,
            "ReviewedLesions": int(table["lesion_id"].nunique()),
        })
        drv.write_tsv(drv.review_path(self.review_dir, unit.unit, "rim_dseg_tsv"), drv.RIM_DSEG_LOOKUP)

    def reconcile(self) -> int:
        """Rebuild every image older than its table (a server killed between the two writes)."""
        rebuilt = 0
        with self._locked():
            for unit in self.catalog.units.values():
                table_path = drv.review_path(self.review_dir, unit.unit, "rim_decisions")
                dseg_path = drv.review_path(self.review_dir, unit.unit, "rim_dseg")
                if not table_path.is_file():
                    continue
                if not dseg_path.is_file() or dseg_path.stat().st_mtime_ns < table_path.stat().st_mtime_ns:
                    self._cache.pop(unit.unit, None)
                    self._write_dseg(unit, self.table(unit.unit))
                    rebuilt += 1
        if rebuilt:
            LOGGER.info("rebuilt %d rim dseg image(s) from their decisions tables", rebuilt)
        return rebuilt

