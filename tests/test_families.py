"""Generator families (qsmrim_app/synthetic/families.py) and the leave-one-family-out split logic.

The designs and acquisition draws are cheap and checked by default; one small session per family is
generated twice through `qsmrim-synth --family` in the slow test (needs ../shared/data; skips without it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark

from qsmrim_app.synthetic import main as synth_main
from qsmrim_app.synthetic.families import FAMILIES, get_family
from qsmrim_app.synthetic.semireal import GRIDS, draw_acquisition
from qsmrim_app.synthetic.anatomy import rng_for
from qsmrim_app.synthetic.semireal_head import BACKGROUNDS



def _bench():
    return load_benchmark("bench_families")


def test_every_family_is_valid_and_differs_from_the_others() -> None:
    assert "semireal" in FAMILIES and not FAMILIES["semireal"].randomised
    seen = set()
    for fam in FAMILIES.values():
        assert fam.background in BACKGROUNDS
        assert all(g in GRIDS for g in fam.grids)
        for name in ("rim_chi", "rim_thickness", "rim_coverage", "arc_coverage", "tkd_threshold", "map_scale"):
            lo, hi = getattr(fam, name)
            assert lo <= hi, (fam.name, name)
        assert set(fam.inversion) <= {"tkd", "tikhonov", "gradient-l2", "tv"}
        key = (fam.background, fam.rim_chi, fam.inversion, fam.grids)
        assert key not in seen  # background, rim physics and reconstruction differ together
        seen.add(key)
    # together the randomised families reach faint and strong rims, arcs past the 2/3 rule, both inversions
    rand = [f for f in FAMILIES.values() if f.randomised]
    assert min(f.rim_chi[0] for f in rand) <= 0.01 and max(f.rim_chi[1] for f in rand) >= 0.06
    assert min(f.rim_coverage[0] for f in rand) < 2 / 3 < max(f.arc_coverage[1] for f in rand)
    assert {"tkd", "tikhonov", "gradient-l2"} <= {m for f in rand for m in f.inversion}
    # our own inversions of real tissue fields are backgrounds of some family; base rates differ across them
    assert {"cosmos-tv", "ich-a-tv"} <= {f.background for f in rand}
    assert len({f.rim_fraction for f in rand}) >= 3
    with pytest.raises(ValueError, match="unknown family"):
        get_family("nope")


def test_acquisition_draws_are_deterministic_per_seed() -> None:
    fam = FAMILIES["cosmos-faint"]
    a = draw_acquisition(fam, rng_for(0, 3, 7))
    assert a == draw_acquisition(fam, rng_for(0, 3, 7))
    others = {draw_acquisition(fam, rng_for(s, 3, 7)) for s in range(1, 6)}
    assert a not in others or len(others) > 1
    assert fam.tkd_threshold[0] <= a.inversion.threshold <= fam.tkd_threshold[1]


@pytest.mark.slow
def test_lesion_designs_are_deterministic_per_seed_and_follow_the_family(shared_data: Path) -> None:
    from qsmrim_app.synthetic.semireal_lesions import lesion_designs

    fam = FAMILIES["ich-b-mixed"]
    first = lesion_designs(shared_data, 1, 0, family=fam)
    assert first == lesion_designs(shared_data, 1, 0, family=fam)
    other = lesion_designs(shared_data, 1, 1, family=fam)
    assert [d.rim_chi for d in first.values()] != [d.rim_chi for d in other.values()]
    rims = [d for d in first.values() if d.kind == "rim"]
    assert rims and all(fam.rim_chi[0] <= d.rim_chi <= fam.rim_chi[1] for d in rims)
    assert all(fam.rim_thickness[0] <= d.rim_thickness <= fam.rim_thickness[1] for d in rims)
    assert {d.kind for d in first.values()} >= {"rim", "plain"}
    # the plain semi-real family draws exactly what the generator drew before families existed
    assert lesion_designs(shared_data, 1, 0, family=FAMILIES["semireal"]) == lesion_designs(shared_data, 1, 0)


def test_a_family_can_give_rims_to_small_lesions(shared_data: Path) -> None:
    """The eligible volume and height are the family's: the defaults are the generator's (80 mm3, 9 mm), under
    which no lesion below 80 mm3 gets a rim; lowered, small lesions get rims, and each lesion's other draws
    (rim strength, thickness) do not move."""
    from dataclasses import replace

    from qsmrim_app.synthetic.semireal_lesions import ELIGIBLE_HEIGHT_MM, ELIGIBLE_VOLUME_MM3, lesion_designs

    fam = FAMILIES["ich-b-mixed"]
    assert (fam.eligible_volume_mm3, fam.eligible_height_mm) == (ELIGIBLE_VOLUME_MM3, ELIGIBLE_HEIGHT_MM)
    small = replace(fam, eligible_volume_mm3=(20.0, 12000.0), eligible_height_mm=3.0)
    before, after = {}, {}
    for patient in (1, 2, 3):
        before.update({(patient, k): d for k, d in lesion_designs(shared_data, patient, 0, family=fam).items()})
        after.update({(patient, k): d for k, d in lesion_designs(shared_data, patient, 0, family=small).items()})
    assert not [d for d in before.values() if d.kind != "plain" and d.volume_mm3 < 80]
    assert [d for d in after.values() if d.kind == "rim" and d.volume_mm3 < 80]
    assert [d.rim_thickness for d in before.values()] == [d.rim_thickness for d in after.values()]


def test_the_small_families_give_rims_of_every_size(shared_data: Path) -> None:
    """The `-small` families' rims reach lesions under 80 mm3 (where every other family gives none) while the
    share of lesions given a rim is the family's rim fraction (the rate is per eligible lesion)."""
    from qsmrim_app.synthetic.semireal_lesions import COUNTED_VOXELS, PATIENTS, lesion_designs

    small = [f for f in FAMILIES.values() if f.eligible_volume_mm3[0] < 80]
    assert {f.name for f in small} == {"ich-b-small", "cosmos-small"}
    for fam in small:
        designs = [d for p in (4, 6) for d in lesion_designs(shared_data, p, 0, family=fam).values()]
        rims = np.array([d.volume_mm3 for d in designs if d.kind == "rim"])
        assert (rims < 80).sum() >= 5 and (rims >= 80).sum() >= 2, (fam.name, rims)
        # the rate is per eligible lesion: over the generator's 20 patients the share of counted lesions given a
        # rim is the family's rim fraction (binomial sd ~0.01; applied per counted lesion it would be ~0.1)
        cohort = [d for p in PATIENTS for d in lesion_designs(shared_data, p, 0, family=fam).values()
                  if d.volume_mm3 >= COUNTED_VOXELS]
        share = sum(d.kind == "rim" for d in cohort) / len(cohort)
        assert abs(share - fam.rim_fraction) <= 0.03, (fam.name, share)


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.nii.gz")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(np.asarray(nib.load(path).dataobj).tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_family_session_is_deterministic_per_seed(shared_data: Path, tmp_path: Path) -> None:
    """patient03 (18 lesions) on the 1x1x3 mm grid of `ich-b-mixed`: same seed, same arrays; another, not."""
    common = ["--family", "ich-b-mixed", "--patients", "3", "--grids", "1x1x3", "--data-dir", str(shared_data),
              "--head-cache", str(tmp_path / "head")]
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert synth_main([str(tmp_path / name), *common, "--seed", str(seed)]) == 0
        digests.append(_digest(tmp_path / name))
    assert digests[0] == digests[1] != digests[2]
    sessions = pd.read_csv(tmp_path / "a_truth" / "sessions.tsv", sep="\t")
    assert sessions.loc[0, "family"] == "ich-b-mixed" and sessions.loc[0, "background"] == "ich-b"
    qsm = nib.load(tmp_path / "a" / "sub-03" / "ses-1x1x3" / "anat" / "sub-03_ses-1x1x3_Chimap.nii.gz")
    assert qsm.shape == GRIDS["1x1x3"].shape and np.isfinite(qsm.get_fdata()).all()


def test_lofo_splits_leave_each_family_out_and_never_train_on_test_families() -> None:
    bench = _bench()
    families = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["blind"] * 3)
    splits = bench.lofo_splits(families, test_only=["blind"])
    assert [s.left_out for s in splits] == ["a", "b", "c", "blind"]
    for s in splits:
        assert set(families[s.test_idx]) == {s.left_out}
        assert "blind" not in set(families[s.train_idx])
        assert not set(s.train_idx) & set(s.test_idx)
        if not s.test_only:
            assert set(families[s.train_idx]) == {"a", "b", "c"} - {s.left_out}
    assert splits[-1].test_only and set(families[splits[-1].train_idx]) == {"a", "b", "c"}
    assert sorted(np.concatenate([s.test_idx for s in splits]).tolist()) == list(range(families.size))
    with pytest.raises(ValueError, match="two training families"):
        bench.lofo_splits(np.array(["a", "a", "blind"]), test_only=["blind"])


@pytest.mark.slow
def test_lofo_benchmark_end_to_end_on_a_tiny_table(tmp_path: Path) -> None:
    """Three tiny families of lesions (rim+ carry a higher floor score) through the sklearn floors:
    every left-out family is scored, predictions land in the TSV, the pooled paired bootstrap is there."""
    from qsmrim_app.model.data import LesionSet, concat
    from qsmrim_app.model.inputs import FLOOR_COLUMN

    bench = _bench()
    rng = np.random.default_rng(0)
    names = ["original_firstorder_Mean", "original_firstorder_Median", FLOOR_COLUMN]
    sets, fams = [], []
    for f, shift in (("a", 0.0), ("b", 0.5), ("c", -0.5)):
        n = 60
        y = (np.arange(n) % 6 == 0).astype(np.int64)
        x = rng.normal(0, 1, (n, 3)).astype(np.float32) + shift
        x[:, 2] += 3 * y
        x[:, 0] += 1.5 * y
        sets.append(LesionSet(np.zeros((n, 4, 2, 2, 2), np.float32), x, names, y,
                              np.array([f"{f}.s{i % 4}" for i in range(n)]), np.arange(n),
                              reference=np.tile([[0.0, 1.0]], (n, 1)).astype(np.float32),
                              extent_mm=np.array([1.5, 1.5, 3.0], np.float32), sessions=np.full(n, "")))
        fams.append(np.full(n, f))
    lesions, families = concat(sets), np.concatenate(fams)

    class Args:
        work, protocol, folds, seeds, max_steps, seed, n_boot = tmp_path, "fast", 3, 1, None, 0, 50

    summary, preds = bench.run(lesions, families, [], ["shell-core", "logreg"], Args)
    assert set(summary["lofo"]) == {"a", "b", "c"}
    for entry in summary["lofo"].values():
        assert entry["methods"]["shell-core"]["roc_auc_pooled"] > 0.8  # the signal is in the floor column
        assert entry["train_lesions"] == 120
    assert len(preds) == 2 * 180 and set(preds["method"]) == {"shell-core", "logreg"}
    assert "logreg" in summary["pooled_lofo_paired_vs_shell-core"]
    assert summary["pooled_lofo"]["shell-core"]["n_lesions"] == 180 and summary["pooled_lofo"]["shell-core"]["n_scans"] == 12
    cv, cv_rows = bench.in_family(lesions, families, ["shell-core", "model:unused"], Args)
    assert set(cv) == {"a", "b", "c"} and set(cv["a"]) == {"shell-core"}  # a fixed model has no in-family CV
    assert cv["a"]["shell-core"]["roc_auc_pooled"] > 0.8 and len(cv_rows) == 180
