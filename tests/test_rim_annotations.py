"""--rim-annotations: the one dataset the participant level takes rim annotations from."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qsmrim_app.bids import discover
from qsmrim_app.cli.run import main
from test_bids import QSM_AFFINE, QSM_SHAPE, _json, _save, make_config, make_dataset
from test_cli import dispatched  # noqa: F401 (fixture)


def review_dataset(root: Path, subjects: tuple[str, ...]) -> Path:
    """A qsmrim-review-like dataset: desc-rim_dseg on the QSM grid for some participants."""
    _json(root / "dataset_description.json", {"Name": "review", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                                              "GeneratedBy": [{"Name": "qsmrim-review"}]})
    for subject in subjects:
        rim = np.zeros(QSM_SHAPE, np.uint8)
        rim[1:3, 1:3, 1:3] = 2
        _save(root / f"sub-{subject}" / "anat" / f"sub-{subject}_space-QSM_desc-rim_dseg.nii.gz", rim, QSM_AFFINE)
    return root


def test_the_given_dataset_alone_is_searched(tmp_path: Path) -> None:
    bids = make_dataset(tmp_path / "ds")  # derivatives/lesions holds a desc-rim_dseg for everyone
    review = review_dataset(tmp_path / "review", ("01", "02"))
    # As an ordinary derivatives dataset the review competes with derivatives/lesions: ambiguous.
    inputs, problems = discover(make_config(bids, tmp_path, derivatives=(review.resolve(),)))
    assert {p.subject for p in problems} == {"01", "02"}
    assert all("several rim annotation files" in p.message for p in problems)
    # With --rim-annotations it is the only source: no ambiguity, and participants it lacks have none.
    inputs, problems = discover(make_config(bids, tmp_path, derivatives=(review.resolve(),),
                                            rim_annotations=review.resolve()))
    assert problems == []
    found = {unit.subject: unit for unit in inputs}
    for subject in ("01", "02"):
        assert found[subject].rim_labels == review / f"sub-{subject}" / "anat" / f"sub-{subject}_space-QSM_desc-rim_dseg.nii.gz"
        assert found[subject].rim_labels_space == "QSM"
    assert found["03"].rim_labels is None


def test_command_line(tmp_path: Path, dispatched: dict) -> None:  # noqa: F811
    bids = make_dataset(tmp_path / "ds")
    review = review_dataset(tmp_path / "review", ("01",))
    assert main([str(bids), str(tmp_path / "out"), "participant", "--rim-annotations", str(review)]) == 0
    config, inputs, problems = dispatched["participant"]
    assert config.rim_annotations == review.resolve() and problems == []
    assert [u.rim_labels is not None for u in inputs] == [True, False, False]
    assert main([str(bids), str(tmp_path / "out"), "participant", "--rim-annotations",
                 str(tmp_path / "missing")]) == 64
    (tmp_path / "out").mkdir(exist_ok=True)
    assert main([str(bids), str(tmp_path / "out"), "participant", "--rim-annotations", str(tmp_path / "out")]) == 64
