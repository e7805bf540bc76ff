"""Which feature columns carry rim evidence to data made another way: leave-one-family-out by feature set.

The fusion's feature component is a penalised logistic regression on 403 columns (pyradiomics without the
voxel counts, plus the radial profile). This asks, with that same learner (`comparators.fit_logreg`, the
app's `FeatureScaler`), which columns generalise: every family of the training corpus left out in turn
(mean of the families' own PR AUC, each set against the first with participants resampled within each
family) and a test family never trained on (the blind family), overall, per lesion-volume bin (small rims are
where the bundled model fails, docs/families.md) and against the first set by a paired participant bootstrap. Candidate columns not in
the app are computed here from the stored raw patches (``desc-patches_lesions.npz``), so a candidate is
measured before it is added to the participant level:

- ``outer`` (7 columns): the rim band's contrast to the tissue just outside it (the band 1 mm inside to 2 mm
  outside the edge, the outside 3-5 mm out), in robust SDs of the local reference. Per axial 1.5 mm slice of
  the patch: c75 = the band's 75th percentile minus the outside's median, c90 the same with the 90th, and a1 /
  a2 = the fraction of 12 edge sectors whose 75th percentile exceeds that slice's outside median by 1 / 2 SDs.
  Columns: c75 on the best slice and on the second best, c90 on the second best, a1 on the best and the
  second best, a2 on the second best (a second best is 0 when only one slice has a band and an outside: a rim
  on one slice is not the consensus's rim), and the whole band's 75th percentile minus the whole outside's
  median. In a small lesion every part of the core lies within the rim's blur, so the outside, not the core,
  is the contrast that is left.

    python benchmarks/bench_feature_sets.py --outputs TRAIN_OUT --participants TRAIN_BIDS/participants.tsv \\
        --test-family blind=BLIND_OUT --out benchmarks/results/feature_sets.json
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # the volume bins and the paired per-family mean of the others

from bench_blind_breakdown import VOLUME_BINS_MM3  # noqa: E402  (about the blind family's terciles)

from qsmrim_app.radial import RIM_BAND_MM, SECTORS, SIGMA_LEVELS, _sector_fractions  # noqa: E402

OUTSIDE_MM = (3.0, 5.0)
OUTER_NAMES = ("outer_slice_p75_max", "outer_slice_p75_2nd", "outer_slice_p90_2nd", "outer_arc_k1_max",
               "outer_arc_k1_2nd", "outer_arc_k2_2nd", "outer_band_p75")
VOLUME_COLUMN = "original_shape_VoxelVolume"  # mm3 (voxels x voxel volume): the lesion tables' volume_mm3
MIN_VOXELS = 4  # a slice's band or outside with fewer voxels says nothing


def _kth(values: np.ndarray, k: int) -> float:
    """The k-th largest (0: the largest); 0 when there are fewer than k + 1 slices (no evidence on a k-th
    slice, the neutral value of a contrast and a fraction), NaN when there is none at all (the scaler imputes)."""
    v = np.sort(values[np.isfinite(values)])[::-1]
    if not v.size:
        return np.nan
    return float(v[k]) if v.size > k else 0.0


def outer_contrast(patch: np.ndarray, reference: Sequence[float], spacing_mm: Sequence[float]) -> np.ndarray:
    """The :data:`OUTER_NAMES` values of one raw patch (channels of ``patches.RAW_CHANNELS``), in robust SDs."""
    z = (patch[0].astype(np.float64) - float(reference[0])) / float(reference[1])
    sd, usable = patch[2].astype(np.float64), patch[3] < 0.5
    inside = sd < 0
    band = (sd >= RIM_BAND_MM[0]) & (sd <= RIM_BAND_MM[1]) & usable
    outer = (sd >= OUTSIDE_MM[0]) & (sd <= OUTSIDE_MM[1]) & usable
    x, y = np.meshgrid(np.arange(sd.shape[0]) * spacing_mm[0], np.arange(sd.shape[1]) * spacing_mm[1], indexing="ij")
    contrast, arcs = [], []
    for k in range(sd.shape[2]):
        b, o, ins, zk = band[:, :, k], outer[:, :, k], inside[:, :, k], z[:, :, k]
        if b.sum() < MIN_VOXELS or o.sum() < MIN_VOXELS or not ins.any():
            continue
        level = np.median(zk[o])
        contrast.append((np.percentile(zk[b], 75) - level, np.percentile(zk[b], 90) - level))
        angle = np.arctan2(y - y[ins].mean(), x - x[ins].mean())
        sector = np.minimum(((angle + np.pi) / (2 * np.pi) * SECTORS).astype(int), SECTORS - 1)
        arcs.append(_sector_fractions(zk - level, b, sector, SECTORS))  # radial.py's arcs, above the outside
    c = np.asarray(contrast, float).reshape(-1, 2)
    a = np.asarray(arcs, float).reshape(-1, len(SIGMA_LEVELS))
    whole = (np.percentile(z[band], 75) - np.median(z[outer])) if band.any() and outer.any() else np.nan
    return np.array([_kth(c[:, 0], 0), _kth(c[:, 0], 1), _kth(c[:, 1], 1), _kth(a[:, 0], 0), _kth(a[:, 0], 1),
                     _kth(a[:, 1], 1), whole], np.float32)


def outer_table(patches: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    return np.stack([outer_contrast(p, r, spacing_mm) for p, r in zip(patches, reference)]) if len(patches) \
        else np.zeros((0, len(OUTER_NAMES)), np.float32)


def feature_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """The column sets compared: the fusion's feature component's columns, the radial profile with the shape
    features, and each with the outer-contrast candidates."""
    from qsmrim_app.model.config import protocol_config
    from qsmrim_app.model.methods import feature_names

    app = feature_names(protocol_config("fast", method="features-only"), list(names))
    compact = [n for n in app if n.startswith("radial_") or n.startswith("original_shape_")]
    return {"app (pyradiomics + radial)": app, "app + outer": app + list(OUTER_NAMES),
            "radial + shape": compact, "radial + shape + outer": compact + list(OUTER_NAMES)}


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from qsmrim_app.model.comparators import fit_logreg
    from qsmrim_app.model.data import FeatureScaler

    scaler = FeatureScaler.fit(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fit_logreg(scaler.transform(x_train), y_train, [], 0)
    return model.predict_proba(np.nan_to_num(scaler.transform(x_test)))[:, 1]


def _auc(y: np.ndarray, p: np.ndarray) -> dict:
    from qsmrim_app.model.metrics import pr_auc, roc_auc

    ok = 0 < int(y.sum()) < y.size
    return {"n": int(y.size), "rim_positive": int(y.sum()),
            "roc_auc": float(roc_auc(y, p)) if ok else None, "pr_auc": float(pr_auc(y, p)) if ok else None}


def evaluate(table: pd.DataFrame, labels: np.ndarray, groups: np.ndarray, sets: dict[str, list[str]],
             tests: dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]], subjects: np.ndarray,
             n_boot: int = 2000) -> dict:
    """Per feature set: leave-one-group-out PR/ROC AUC per group and their mean (against the first set:
    participants resampled within each group, paired); each test family (table, labels, participants) scored
    by the model fitted on every group, overall, per volume bin, and against the first set by a paired
    participant bootstrap."""
    from bench_lofo_models import per_family_mean

    from qsmrim_app.model.metrics import paired_bootstrap

    out, first, held_out = {}, {}, {}
    for name, columns in sets.items():
        x = table[columns].to_numpy(np.float64)
        lofo, prob = {}, np.full(labels.size, np.nan)
        for g in sorted(set(groups)):
            held = groups == g
            prob[held] = _fit_predict(x[~held], labels[~held], x[held])
            lofo[str(g)] = _auc(labels[held], prob[held])
        held_out[name] = pd.DataFrame({"label": labels, "probability": prob, "family": groups, "subject": subjects})
        entry = {"n_columns": len(columns), "lofo": lofo,
                 "lofo_mean_pr_auc": float(np.mean([v["pr_auc"] for v in lofo.values() if v["pr_auc"] is not None])),
                 "test": {}}
        predicted = {}
        if tests:  # one fit on every group scores all the test families
            stacked = _fit_predict(x, labels, np.vstack([t[columns].to_numpy(np.float64) for t, _, _ in tests.values()]))
            predicted = dict(zip(tests, np.split(stacked, np.cumsum([len(t) for t, _, _ in tests.values()])[:-1])))
        for test_name, (test_table, y, people) in tests.items():
            p = predicted[test_name]
            bins = pd.cut(test_table[VOLUME_COLUMN], VOLUME_BINS_MM3)
            if bins.isna().any():
                raise ValueError(f"{test_name}: {int(bins.isna().sum())} lesions without a {VOLUME_COLUMN}")
            entry["test"][test_name] = {"all": _auc(y, p), "by_volume_mm3": {
                f"{iv.left:g}-{iv.right:g}": _auc(y[(bins == iv).to_numpy()], p[(bins == iv).to_numpy()])
                for iv in bins.cat.categories if (bins == iv).any()}}
            if test_name in first:  # this set minus the first, the same participants resampled for both
                boot = paired_bootstrap(y, p, first[test_name], people, n_boot=n_boot)
                entry["test"][test_name]["minus_first_set"] = {
                    "n_clusters": boot["n_clusters"], "n_boot": boot["n_boot"], "n_valid": boot["n_valid"],
                    **{m: {k: boot[m][k] for k in ("difference", "ci_low", "ci_high", "p_value")}
                       for m in ("roc_auc", "pr_auc")}}
            else:
                first[test_name] = p
        out[name] = entry
    paired = per_family_mean(held_out, n_boot)  # first minus each other set
    for name, d in paired["paired_vs_" + next(iter(sets))].items():
        out[name]["lofo_mean_minus_first_set"] = {  # as the test family's: this set minus the first
            m: {"difference": -v["difference"], "ci_low": -v["ci_high"], "ci_high": -v["ci_low"]} for m, v in d.items()}
    return out


def lesion_table(outputs: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(feature table with the outer columns, labels, subjects) of every annotated lesion of an output dir."""
    from qsmrim_app.workflows.training import collect_lesion_set

    lesions = collect_lesion_set(Path(outputs))
    table = pd.DataFrame(lesions.features, columns=lesions.feature_names)
    outer = outer_table(lesions.patches, lesions.reference, np.asarray(lesions.voxel_size_mm, float))
    table[list(OUTER_NAMES)] = outer
    return table, np.asarray(lesions.labels, int), np.asarray(lesions.subjects, str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", type=Path, required=True, help="the training corpus' participant outputs")
    parser.add_argument("--participants", type=Path, required=True, help="its participants.tsv")
    parser.add_argument("--column", default="family", help="the participants.tsv column left out in turn")
    parser.add_argument("--test-family", action="append", default=[], metavar="NAME=OUT")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    table, labels, subjects = lesion_table(args.outputs)
    group_of = pd.read_csv(args.participants, sep="\t", dtype=str).set_index("participant_id")[args.column]
    groups = np.array([group_of[s] for s in subjects])
    tests = {}
    for item in args.test_family:
        name, path = item.split("=", 1)
        tests[name] = lesion_table(Path(path))
    summary = {"command": " ".join(sys.argv if argv is None else ["bench_feature_sets.py", *argv]),
               "learner": "comparators.fit_logreg on FeatureScaler-scaled columns (the fusion's feature component)",
               "n_lesions": int(labels.size), "rim_positive": int(labels.sum()),
               "n_boot": args.n_boot,
               "sets": evaluate(table, labels, groups, feature_sets(table.columns), tests, subjects, args.n_boot)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for name, entry in summary["sets"].items():
        tail = " ".join(f"{t}: PR {v['all']['pr_auc']:.3f} ROC {v['all']['roc_auc']:.3f}"
                        + (" (PR minus the first set {difference:+.3f} [{ci_low:+.3f}, {ci_high:+.3f}])".format(
                            **v["minus_first_set"]["pr_auc"]) if "minus_first_set" in v else "")
                        for t, v in entry["test"].items())
        vs = entry.get("lofo_mean_minus_first_set", {}).get("pr_auc")
        vs = " ({difference:+.3f} [{ci_low:+.3f}, {ci_high:+.3f}])".format(**vs) if vs else ""
        print(f"{name:28s} ({entry['n_columns']} columns) leave-one-{args.column}-out mean PR "
              f"{entry['lofo_mean_pr_auc']:.3f}{vs}  {tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
