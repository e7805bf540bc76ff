"""Lesion masks as users have them, through the command line: a merged binary mask, LST-AI's layouts.

One phantom dataset (2 participants, 25 lesions of which 9 merge into confluent blobs) whose lesions are
given only as binary masks (the instance maps removed), run twice with one work directory: first from
the binary masks in derivatives/ (classified with the bundled model), then with sub-01's mask in LST-AI's
own output folder (-d) and sub-02's in the layout of LST-AI's BIDS wrapper (under derivatives/). The
second run reuses the cached registration (--no-classify) and must find both layouts untouched and give
the same lesions.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lesion_layouts import write_lstai_bids, write_lstai_output
from qsmrim_app import derivatives as drv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SUBJECTS = ("01", "02")


def run_app(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-5000:]}"
    return proc


def digest(root: Path) -> str:
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    """Phantom with binary masks only, and the first run's outputs."""
    from qsmrim_app.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("lesion_inputs")
    bids = root / "bids"
    truth = generate_dataset(bids, n_subjects=len(SUBJECTS), seed=0)
    for pattern in ("*_desc-lesion_dseg.*", "*_desc-rim_dseg.*"):
        for path in (bids / "derivatives").rglob(pattern):
            path.unlink()
    run_app(bids, root / "out1", "participant", "--nprocs", "2", "-w", root / "work")
    return {"root": root, "bids": bids, "truth": pd.read_csv(truth / "subjects.tsv", sep="\t")}


def _dseg(out: Path, subject: str) -> np.ndarray:
    return np.asanyarray(nib.load(drv.output_path(out, drv.Unit(subject), "lesions_dseg")).dataobj)


def test_merged_binary_masks_give_the_true_lesion_counts(merged) -> None:
    bids, out = merged["bids"], merged["root"] / "out1"
    true_counts = merged["truth"].set_index("participant_id")["n_lesions"]
    counts, components = {}, {}
    for subject in SUBJECTS:
        mask = bids / f"derivatives/lesions/sub-{subject}/anat/sub-{subject}_desc-lesion_mask.nii.gz"
        components[subject] = ndimage.label(np.asanyarray(nib.load(mask).dataobj) > 0, np.ones((3, 3, 3)))[1]
        summary = drv.read_tsv(drv.output_path(out, drv.Unit(subject), "summary"))
        counts[subject] = int(summary["n_lesions"].iloc[0])
    total_true = int(true_counts.sum())
    # the phantom really has confluent lesions: connected components alone miss more than 10 %
    assert sum(components.values()) < 0.9 * total_true
    assert abs(sum(counts.values()) - total_true) <= 0.1 * total_true, (counts, dict(true_counts))


def test_rim_classification_runs_on_each_split_lesion(merged) -> None:
    out = merged["root"] / "out1"
    split_any = False
    for subject in SUBJECTS:
        unit = drv.Unit(subject)
        ids = sorted(int(i) for i in np.unique(_dseg(out, subject)) if i > 0)
        for role in ("lesions_dseg_tsv", "radiomics", "rim_lesions"):
            table = drv.read_tsv(drv.output_path(out, unit, role))
            assert "split_from" in table.columns
            key = "index" if role == "lesions_dseg_tsv" else "lesion_id"
            assert sorted(table[key].astype(int)) == ids
        rim = drv.read_tsv(drv.output_path(out, unit, "rim_lesions"))
        assert rim["probability"].between(0, 1).all() and rim["probability"].notna().all()
        split = rim[rim["split_from"].notna()]
        split_any |= not split.empty
        # every split component yields at least two lesions
        assert (split.groupby("split_from").size() >= 2).all()
        features = drv.read_tsv(drv.output_path(out, unit, "radiomics"))
        assert features.filter(like="original_firstorder_Mean").notna().all().all()
        report = (drv.report_path(out, unit)).read_text()
        if not split.empty:
            assert "confluent component(s) were split automatically" in report
    assert split_any


def test_lstai_layouts_found_untouched_and_give_the_same_lesions(merged) -> None:
    root, bids = merged["root"], merged["bids"]
    lesions = bids / "derivatives" / "lesions"
    mask = lambda s: lesions / f"sub-{s}/anat/sub-{s}_desc-lesion_mask.nii.gz"  # noqa: E731
    lst_output = root / "lstai_output"  # LST-AI's own --output folders, given with -d
    bare = write_lstai_output(lst_output, "01", None, mask("01"))
    wrapper = write_lstai_bids(bids / "derivatives" / "lst-ai-v1.1.0b", "02", None, mask("02"),
                               flair=bids / "sub-02/anat/sub-02_FLAIR.nii.gz")
    for subject in ("01", "02"):
        mask(subject).unlink()
        mask(subject).with_name(mask(subject).name.replace(".nii.gz", ".json")).unlink()
    before = (digest(lst_output), digest(bids))
    run_app(bids, root / "out2", "participant", "--nprocs", "2", "-w", root / "work", "-d", lst_output,
            "--no-classify")
    assert (digest(lst_output), digest(bids)) == before, "an input folder was written to"
    for subject, source in (("01", bare), ("02", wrapper)):
        dseg = drv.output_path(root / "out2", drv.Unit(subject), "lesions_dseg")
        assert str(source) in json.loads(drv.sidecar_path(dseg).read_text())["Sources"][0] or \
            source.name in json.loads(drv.sidecar_path(dseg).read_text())["Sources"][0]
        assert np.array_equal(_dseg(root / "out2", subject), _dseg(root / "out1", subject))
        features = drv.read_tsv(drv.output_path(root / "out2", drv.Unit(subject), "radiomics"))
        assert features["split_from"].notna().any()
