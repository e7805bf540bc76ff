"""scripts/merge_bids.py: sources merge into one dataset the app can read, relabelled, sessions united."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "merge_bids.py"


def _dataset(root: Path, subjects: list[str], session: str | None) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": root.name, "BIDSVersion": "1.9.0"}))
    (root / "README").write_text(root.name)
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "group": "MS"}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    deriv = root / "derivatives" / "lesions"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps({"Name": "truth", "DatasetType": "derivative"}))
    for s in subjects:
        ses_dir, ent = (f"ses-{session}/", f"_ses-{session}") if session else ("", "")
        for base, suffix in ((root, "FLAIR"), (deriv, "desc-lesion_dseg")):
            f = base / f"sub-{s}" / ses_dir / "anat" / f"sub-{s}{ent}_{suffix}.nii.gz"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"{root.name} {s} {suffix}")
        if session:
            pd.DataFrame({"session_id": [f"ses-{session}"], "grid": [session]}).to_csv(
                root / f"sub-{s}" / f"sub-{s}_sessions.tsv", sep="\t", index=False)
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_merges_sessions_and_relabels_sources(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", ["01", "03"], "g1")
    b = _dataset(tmp_path / "b", ["01", "02"], "g2")
    ph = _dataset(tmp_path / "ph", ["01"], None)
    out = tmp_path / "merged"
    res = _run(str(out), str(a), str(b), f"{ph}:phf")
    assert res.returncode == 0, res.stderr
    # sub-01 of a and b is one participant with two sessions; the phantom's sub-01 is sub-phf01
    assert (out / "sub-01/ses-g1/anat/sub-01_ses-g1_FLAIR.nii.gz").read_text() == "a 01 FLAIR"
    assert (out / "sub-01/ses-g2/anat/sub-01_ses-g2_FLAIR.nii.gz").read_text() == "b 01 FLAIR"
    assert (out / "sub-phf01/anat/sub-phf01_FLAIR.nii.gz").read_text() == "ph 01 FLAIR"
    assert (out / "derivatives/lesions/sub-phf01/anat/sub-phf01_desc-lesion_dseg.nii.gz").read_text() \
        == "ph 01 desc-lesion_dseg"
    assert (out / "derivatives/lesions/dataset_description.json").is_file()
    sessions = pd.read_csv(out / "sub-01/sub-01_sessions.tsv", sep="\t")
    assert list(sessions["session_id"]) == ["ses-g1", "ses-g2"]
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    assert sorted(participants["participant_id"]) == ["sub-01", "sub-02", "sub-03", "sub-phf01"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][-1]["Name"] == "scripts/merge_bids.py"
    # the sources are untouched (the description was replaced, not written through a hard link)
    assert json.loads((a / "dataset_description.json").read_text())["Name"] == "a"
    # and pybids reads the merged dataset: every participant, both sessions of sub-01
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(out, validate=False)
    assert sorted(layout.get_subjects()) == ["01", "02", "03", "phf01"]
    assert sorted(layout.get_sessions(subject="01")) == ["g1", "g2"]


def test_refuses_the_same_session_from_two_sources(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", ["01"], "g1")
    b = _dataset(tmp_path / "b", ["01"], "g1")
    res = _run(str(tmp_path / "merged"), str(a), str(b))
    assert res.returncode != 0
    assert "comes from two sources" in res.stderr
