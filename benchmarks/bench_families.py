"""Leave-one-family-out: does what a model learnt on some generator families hold on one it never saw?

Each family (docs/families.md) is a participant-level output directory of one generator family, run as a
user would (``qsmrim BIDS OUT participant --no-classify``, rim labels from the dataset's derivatives). For
every family F the recipe and every floor are trained on all the other training families and scored on F;
test-only families (``--test-family``, e.g. the blind family built from a written specification) are never
trained on and are scored by models trained on all training families. Every model is trained with the
app's own code (``model.train.train``: cross-validated members, the F1 threshold fitted on the training
families' out-of-fold probabilities) and predicts with ``model.predict.load_ensemble``, as the bundled
model would.

Per left-out family: ROC / PR AUC, recall and precision at the stored F1 threshold, per-scan count r; the
recipe minus each floor by the paired participant bootstrap (``metrics.paired_bootstrap``), per family and
pooled over all left-out families. ``--in-family`` adds each family's own cross-validation beside it (the
same methods, out-of-fold). ``features-only`` is the fast recipe's wide term alone (the logistic regression
on the network's feature columns: pyradiomics + radial), ``image-only`` the image branch alone: with
``qsmrimnet`` (both) they answer whether the image branch adds to the features across families.

    python benchmarks/bench_families.py --family semireal=OUT1 --family cosmos-faint=OUT2 ... \
        --test-family blind=OUTB --methods qsmrimnet,shell-core,logreg,rf,aprl-rf --protocol fast \
        --work /tmp/lofo --out benchmarks/results/families.json --predictions benchmarks/results/families_predictions.tsv
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from qsmrim_app.model.config import protocol_config
from qsmrim_app.model.methods import feature_names
from qsmrim_app.model.data import FeatureScaler, LesionSet, concat
from qsmrim_app.model.metrics import f1_optimal_threshold, lesion_and_subject_metrics, paired_bootstrap
from qsmrim_app.workflows.training import collect_lesion_set

LOGGER = logging.getLogger("bench_families")
RECIPE = "qsmrimnet"
FLOORS = ("shell-core", "logreg", "rf", "aprl-rf")
FEATURES_ONLY = "features-only"
KEYS = ("roc_auc_pooled", "pr_auc_pooled", "sensitivity", "ppv", "f1", "count_pearson_r", "count_mse")


@dataclass(frozen=True)
class Split:
    """One evaluation: train on `train_idx` (lesions of the training families), test on `left_out`."""

    left_out: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    test_only: bool  # a family never trained on (blind), scored by the model of all training families


def lofo_splits(families: Sequence[str], test_only: Sequence[str] = ()) -> list[Split]:
    """Leave-one-family-out splits over per-lesion family names.

    Each training family is left out once (trained on every other training family); each test-only family
    is scored once by a model of all training families and never trained on. Needs two training families.
    """
    fam = np.asarray(families).astype(str)
    held = set(test_only)
    training = [f for f in dict.fromkeys(fam.tolist()) if f not in held]
    if len(training) < 2:
        raise ValueError(f"leave-one-family-out needs at least two training families, got {training}")
    in_training = ~np.isin(fam, list(held))
    splits = [Split(f, np.flatnonzero(in_training & (fam != f)), np.flatnonzero(fam == f), False) for f in training]
    splits += [Split(f, np.flatnonzero(in_training), np.flatnonzero(fam == f), True)
               for f in dict.fromkeys(fam.tolist()) if f in held]
    return splits


def load_families(dirs: dict[str, Path]) -> tuple[LesionSet, np.ndarray]:
    """Every family's annotated lesions in one set; subjects are prefixed with the family (distinct people)."""
    sets, names = [], []
    for name, path in dirs.items():
        lesions = collect_lesion_set(Path(path))
        if lesions is None:
            raise SystemExit(f"{path}: no annotated lesions (run the participant level on family {name} first)")
        lesions = replace(lesions, subjects=np.asarray([f"{name}.{s}" for s in lesions.subjects]))
        sets.append(lesions)
        names.append(np.full(len(lesions), name))
        LOGGER.info("%s: %d lesions, %d rim+, %d participants", name, len(lesions), int(lesions.labels.sum()),
                    np.unique(lesions.subjects).size)
    return concat(sets), np.concatenate(names)


def scans(lesions: LesionSet) -> np.ndarray:
    sessions = lesions.sessions if lesions.sessions is not None else np.full(len(lesions), "")
    return np.asarray([f"{s}_ses-{t}" if t else str(s) for s, t in zip(lesions.subjects, sessions)])


def _features_only(train: LesionSet, test: LesionSet, seed: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The fast recipe's wide term alone: the logreg floor's estimator on the network's feature columns,
    with the F1 threshold from 5-fold out-of-fold probabilities on the training lesions."""
    from qsmrim_app.model.comparators import fit_comparator
    from qsmrim_app.model.folds import stratified_subject_folds

    cols = feature_names(protocol_config("fast", method="features-only"), list(train.feature_names))
    idx = [train.feature_names.index(c) for c in cols]

    def fit_predict(x_tr, y_tr, x_te):
        scaler = FeatureScaler.fit(x_tr)
        model = fit_comparator("logreg", scaler.transform(x_tr), y_tr, cols, seed=seed)
        return model.predict_proba(scaler.transform(x_te))[:, 1]

    x, y = train.features[:, idx], train.labels
    oof = np.zeros(len(train))
    test_p = fit_predict(x, y, test.features[:, idx]) if len(test) else np.zeros(0)
    for tr, te in stratified_subject_folds(train.subjects, y, min(5, int(np.unique(train.subjects).size)), seed):
        oof[np.asarray(te)] = fit_predict(x[np.asarray(tr)], y[np.asarray(tr)], x[np.asarray(te)])
    return test_p, f1_optimal_threshold(y, oof), oof


def fit_and_predict(method: str, train: LesionSet, test: LesionSet, model_dir: Path, args: argparse.Namespace,
                    folds: int | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """(test probabilities, F1 threshold fitted on the training lesions, training out-of-fold probabilities).

    A method `model:DIR` is a trained model directory (e.g. the bundled model) scored as it is, untrained here.
    """
    from qsmrim_app.model.predict import load_ensemble

    if method == FEATURES_ONLY:
        return _features_only(train, test, args.seed)
    if method.startswith("model:"):
        ens = load_ensemble(Path(method[len("model:"):]), device="cpu")
        prob = ens.predict(test.patches, test.features, test.feature_names, reference=test.reference).probability
        return np.asarray(prob, float), float(ens.thresholds["f1"]), np.zeros(0)
    from qsmrim_app.model.train import train as train_model

    from qsmrim_app.model.methods import NETWORK_METHODS

    overrides = dict(folds=args.folds, seeds=args.seeds, max_steps=args.max_steps) if method in NETWORK_METHODS else {}
    if folds is not None:  # a family's own CV: no more folds than it has participants
        overrides["folds"] = folds
    cfg = protocol_config(args.protocol, method=method, device="cpu", **overrides)
    if any(v is not None for v in overrides.values()):  # a reduced budget trains into a directory of its own
        model_dir = model_dir.with_name(model_dir.name + "".join(f"-{k}{v}" for k, v in overrides.items() if v))
    train_model(train, cfg, model_dir, progress=False)
    oof = pd.read_csv(model_dir / "oof_predictions.tsv", sep="\t")["probability"].to_numpy()
    ens = load_ensemble(model_dir, device="cpu")
    prob = ens.predict(test.patches, test.features, test.feature_names, reference=test.reference).probability
    return np.asarray(prob, float), float(ens.thresholds["f1"]), oof


def score(y: np.ndarray, p: np.ndarray, threshold: float, scan_ids: np.ndarray) -> dict:
    m = lesion_and_subject_metrics(y, p, np.zeros(y.size, int), scan_ids, thresholds_per_fold={0: threshold})
    return {k: m.get(k) for k in KEYS} | {"n_lesions": int(y.size), "n_rimplus": int(y.sum()),
                                          "n_scans": int(np.unique(scan_ids).size), "threshold": threshold}


def _paired(y: np.ndarray, probs: dict[str, np.ndarray], people: np.ndarray, reference: str, n_boot: int) -> dict:
    return {m: paired_bootstrap(y, probs[reference], p, people, n_boot=n_boot)
            for m, p in probs.items() if m != reference}


def run(lesions: LesionSet, families: np.ndarray, test_only: Sequence[str], methods: Sequence[str],
        args: argparse.Namespace, on_split=None) -> tuple[dict, pd.DataFrame]:
    """Every split and method; `on_split(summary, rows)` after each split (partial results of a long run)."""
    rows, results, pooled = [], {}, {m: [] for m in methods}
    pooled_y, pooled_people, pooled_scans, pooled_fold, pooled_thr = [], [], [], [], {m: {} for m in methods}
    reference = methods[0]
    for split in lofo_splits(families, test_only):
        if getattr(args, "only", None) and split.left_out not in args.only:
            continue
        train, test = lesions.subset(split.train_idx), lesions.subset(split.test_idx)
        scan_ids = scans(test)
        entry = {"test_only": split.test_only, "train_families": sorted(set(families[split.train_idx])),
                 "train_lesions": len(train), "train_rimplus": int(train.labels.sum()), "methods": {}}
        probs = {}
        for method in methods:
            start = time.perf_counter()
            p, thr, _ = fit_and_predict(method, train, test, Path(args.work) / f"without-{split.left_out}" / method, args)
            probs[method] = p
            pooled_thr[method][len(pooled_y)] = thr
            entry["methods"][method] = score(test.labels, p, thr, scan_ids) | {"seconds": round(time.perf_counter() - start, 1)}
            LOGGER.info("left out %s, %s: PR AUC %.3f, ROC AUC %.3f (%.0f s)", split.left_out, method,
                        entry["methods"][method]["pr_auc_pooled"], entry["methods"][method]["roc_auc_pooled"],
                        time.perf_counter() - start)
            rows += [{"evaluation": "lofo", "left_out": split.left_out, "family": split.left_out, "method": method,
                      "subject": s, "session": t or "n/a", "lesion_id": int(i), "label": int(yy),
                      "probability": round(float(pp), 6), "threshold": round(thr, 6)}
                     for s, t, i, yy, pp in zip(test.subjects, test.sessions, test.lesion_ids, test.labels, p)]
        if len(methods) > 1 and 0 < test.labels.sum() < len(test):
            entry["paired_vs_" + reference] = _paired(test.labels, probs, test.subjects, reference, args.n_boot)
        results[split.left_out] = entry
        if on_split is not None:
            on_split({"lofo": results, "partial": True}, pd.DataFrame(rows))
        if not split.test_only:
            for m in methods:
                pooled[m].append(probs[m])
            pooled_y.append(test.labels)
            pooled_people.append(test.subjects)
            pooled_scans.append(scan_ids)
            pooled_fold.append(np.full(len(test), len(pooled_y) - 1))
    summary = {"lofo": results}
    if pooled_y:
        # every left-out family at once, each lesion at its own model's stored threshold; counts per scan
        y, ids, folds = np.concatenate(pooled_y), np.concatenate(pooled_scans), np.concatenate(pooled_fold)
        summary["pooled_lofo"] = {}
        for m in methods:
            met = lesion_and_subject_metrics(y, np.concatenate(pooled[m]), folds, ids,
                                             thresholds_per_fold={k: pooled_thr[m][k] for k in np.unique(folds)})
            summary["pooled_lofo"][m] = {k: met.get(k) for k in KEYS} | {
                "n_lesions": int(y.size), "n_rimplus": int(y.sum()), "n_scans": int(np.unique(ids).size),
                "note": "AUCs on all left-out lesions pooled; recall/precision/counts at each model's stored F1 threshold"}
    if pooled_y and len(methods) > 1:
        y, people = np.concatenate(pooled_y), np.concatenate(pooled_people)
        summary["pooled_lofo_paired_vs_" + reference] = _paired(
            y, {m: np.concatenate(v) for m, v in pooled.items()}, people, reference, args.n_boot)
    return summary, pd.DataFrame(rows)


def in_family(lesions: LesionSet, families: np.ndarray, methods: Sequence[str], args: argparse.Namespace
              ) -> tuple[dict, pd.DataFrame]:
    """Each training family's own cross-validation (out-of-fold, subject-stratified folds, at most one fold
    per participant: with two or three participants a family's CV is leave-one-participant-out)."""
    out, rows = {}, []
    methods = [m for m in methods if not m.startswith("model:")]
    for fam in dict.fromkeys(families.tolist()):
        part = lesions.subset(np.flatnonzero(families == fam))
        if part.labels.sum() < 3 or np.unique(part.subjects).size < 2:
            out[fam] = {"skipped": "fewer than 3 rim+ or 2 participants"}
            continue
        out[fam] = {}
        for method in methods:
            # the models are trained for their out-of-fold probabilities; one lesion stands in as a test set
            k = min(protocol_config(args.protocol).folds, int(np.unique(part.subjects).size))
            try:
                _, _, oof = fit_and_predict(method, part, part.subset([0]), Path(args.work) / f"cv-{fam}" / method,
                                            args, folds=k)
            except (ValueError, IndexError) as exc:  # a fold whose training participants hold no rim+ lesion
                out[fam][method] = {"skipped": f"{k}-fold subject CV impossible: {exc}"}
                continue
            thr = f1_optimal_threshold(part.labels, oof)
            out[fam][method] = score(part.labels, oof, thr, scans(part)) | {"threshold_note": "F1-optimal on the OOF"}
            rows += [{"evaluation": "in-family-cv", "left_out": "", "family": fam, "method": method, "subject": s,
                      "session": t or "n/a", "lesion_id": int(i), "label": int(yy), "probability": round(float(pp), 6),
                      "threshold": round(thr, 6)}
                     for s, t, i, yy, pp in zip(part.subjects, part.sessions, part.lesion_ids, part.labels, oof)]
    return out, pd.DataFrame(rows)


def _named_dirs(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=OUTPUT_DIR, got {item!r}")
        out[name] = Path(path)
    return out


def table(summary: dict, methods: Sequence[str]) -> pd.DataFrame:
    rows = []
    for fam, entry in summary["lofo"].items():
        for m in methods:
            r = entry["methods"][m]
            rows.append({"left out": fam + (" (never trained on)" if entry["test_only"] else ""), "method": m,
                         "n/rim+": f"{r['n_lesions']}/{r['n_rimplus']}", "ROC": r["roc_auc_pooled"],
                         "PR": r["pr_auc_pooled"], "recall": r["sensitivity"], "precision": r["ppv"],
                         "count r": r["count_pearson_r"],
                         "in-family PR": (summary.get("in_family", {}).get(fam, {}).get(m) or {}).get("pr_auc_pooled")})
    for m, r in summary.get("pooled_lofo", {}).items():
        rows.append({"left out": "all training families, pooled", "method": m,
                     "n/rim+": f"{r['n_lesions']}/{r['n_rimplus']}", "ROC": r["roc_auc_pooled"],
                     "PR": r["pr_auc_pooled"], "recall": r["sensitivity"], "precision": r["ppv"],
                     "count r": r["count_pearson_r"], "in-family PR": None})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", default=[], metavar="NAME=OUT",
                        help="participant-level output of one training family (repeat, >= 2)")
    parser.add_argument("--test-family", action="append", default=[], metavar="NAME=OUT",
                        help="a family only ever tested on (e.g. the blind family)")
    parser.add_argument("--methods", default=",".join((RECIPE,) + FLOORS),
                        help=f"comma-separated; the first is compared with the others (also: {FEATURES_ONLY}, image-only, "
                             "model:DIR for a trained model directory scored as it is)")
    parser.add_argument("--protocol", default="fast", choices=("fast", "paper"))
    parser.add_argument("--folds", type=int, default=None,
                        help="override the protocol's folds for the networks (cost; the floors keep theirs)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--only", type=lambda t: t.split(","), default=None, metavar="NAMES",
                        help="evaluate only these left-out families (comma-separated; the others still train)")
    parser.add_argument("--in-family", action="store_true", help="also each family's own cross-validation")
    parser.add_argument("--work", type=Path, required=True, help="model directories (reruns resume from them)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, default=None, help="TSV of every left-out/OOF probability")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_dirs, test_dirs = _named_dirs(args.family), _named_dirs(args.test_family)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lesions, families = load_families({**train_dirs, **test_dirs})
    start = time.perf_counter()

    def write(summary: dict, preds: pd.DataFrame) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "protocol": args.protocol,
                                        "overrides": {"folds": args.folds, "seeds": args.seeds,
                                                      "max_steps": args.max_steps}, "methods": methods,
                                        "seconds": round(time.perf_counter() - start, 1), **summary},
                                       indent=1, default=float))
        if args.predictions:
            args.predictions.parent.mkdir(parents=True, exist_ok=True)
            preds.to_csv(args.predictions, sep="\t", index=False)

    summary, preds = run(lesions, families, list(test_dirs), methods, args, on_split=write)
    if args.in_family:
        keep = np.flatnonzero(~np.isin(families, list(test_dirs)))
        summary["in_family"], cv_rows = in_family(lesions.subset(keep), families[keep], methods, args)
        preds = pd.concat([preds, cv_rows], ignore_index=True)
    summary = {"families": {f: {"lesions": int((families == f).sum()), "rimplus": int(lesions.labels[families == f].sum()),
                                "participants": int(np.unique(lesions.subjects[families == f]).size),
                                "test_only": f in test_dirs} for f in dict.fromkeys(families.tolist())},
               **summary}
    write(summary, preds)
    print(table(summary, methods).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    key = "pooled_lofo_paired_vs_" + methods[0]
    if key in summary:
        print(f"\n{methods[0]} minus each method, pooled over left-out families (participant bootstrap):")
        print(pd.DataFrame([{"method": m, **{k: v["pr_auc"][k] for k in ("difference", "ci_low", "ci_high")}}
                            for m, v in summary[key].items()]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
