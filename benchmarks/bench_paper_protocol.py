"""The paper's protocol (ResNet-18 at width 1.0, 40 epochs, 3 seeds per fold) leave-one-family-out, on a GPU.

Issue 18 asks for it on the arrays the bundled model was trained on when a GPU is lent. The corpus is built on
the CPU machine (scripts/make_bundled_model.sh, stages generate participant merge); a GPU machine gets only
arrays, so there are two steps:

    # on the machine that holds the corpus
    python benchmarks/bench_paper_protocol.py pack --output-dir WORK/train_out --bids WORK/train_bids \\
        --column family --out arrays.npz [--float16]
    # on the GPU machine (only torch, numpy, scipy, pandas, scikit-learn, imbalanced-learn and this repo)
    python benchmarks/bench_paper_protocol.py train --arrays arrays.npz --out-dir DIR --workers 1 \\
        --json timing.json
    # anywhere: per left-out family, whatever members finished, beside other methods on the same lesions
    python benchmarks/bench_paper_protocol.py score --arrays arrays.npz --out-dir DIR \\
        --reference benchmarks/results/lofo_models_predictions.tsv --json score.json

``pack`` collects the lesions as ``group --train --cv-group-by COLUMN`` does (workflows/training.py) and stores
their raw patches cut to what the network reads: QSM and FLAIR set to zero where every input level masks them
(beyond the margin, other lesions), the signed distance clipped just beyond the margin. The network inputs are
unchanged (:func:`check_packed`); 1.0 GB of raw patches became 57 MB (35.8 MB with ``--float16``).

``train`` trains the (fold, seed) members of ``protocol_config("paper")`` with one fold per family, in worker
processes that share the device (``model.cv.train_members``), seed-major, so a deadline leaves whole seeds;
each member saves its held-out probabilities (``heldout/``); then ``train()`` in the same directory finds every
member's weights and writes the model directory (model.json, oof_predictions.tsv, calibration, operating
points) over the seeds that finished, and says so. Run again on the same directory, it trains only what is
missing. ``bench_lofo_models.py --model paper=DIR`` scores a whole run beside the bundled recipe and the floors;
``score`` ranks a partial one (a family needs only its own member).

On a GPU the step is compute-bound (7.1 TFLOP per step of 64 patches at width 1.0; on an H200 0.043 s, 86-122 s per
member), so one worker is best: nine workers sharing the H200 finished none within 590 s. ``--channels-last
auto`` times the channels-last layout against the default first (on the H200 it was not faster).
``--float16`` makes the packed corpus fit a 64 MiB transfer (35.8 MB for the bundled model's 3,881 lesions).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare copy of the repository

from qsmrim_app.model.config import TrainConfig, protocol_config  # noqa: E402
from qsmrim_app.model.data import LesionSet  # noqa: E402

FIELDS = ("patches", "features", "labels", "subjects", "lesion_ids", "voxel_size_mm", "reference", "extent_mm",
          "sessions", "groups")


def read_mask(sd: np.ndarray, other: np.ndarray, margin_mm: float) -> np.ndarray:
    """Where some input level reads QSM and FLAIR (inputs.InputSpec.network_inputs): within the margin and not
    another lesion, or (the paper level) inside the lesion."""
    return ((sd <= margin_mm) & ~other) | (sd < 0)


def pack_patches(raw: np.ndarray, margin_mm: float) -> np.ndarray:
    """Raw patches with everything the network never reads set to constants (zeros compress to nothing).

    The input levels keep QSM and FLAIR where the signed distance is <= ``margin_mm`` and no other lesion is,
    or (the paper level) inside the lesion (inputs.InputSpec.network_inputs), and read the distance only
    clipped to +-margin and compared with 0 and the margin. Beyond the margin it becomes margin + 1 (still
    outside), below -margin it becomes -margin (still inside).
    """
    out = np.array(raw, dtype=np.float32, copy=True)
    sd, other = out[:, 2], out[:, 3] > 0.5
    keep = read_mask(sd, other, margin_mm)
    out[:, 0] = np.where(keep, out[:, 0], 0.0)
    out[:, 1] = np.where(keep, out[:, 1], 0.0)
    out[:, 2] = np.where(sd > margin_mm, margin_mm + 1.0, np.maximum(sd, -margin_mm))
    return out


def check_packed(raw: np.ndarray, packed: np.ndarray, reference: np.ndarray, config: TrainConfig,
                 half: bool = False) -> None:
    """Refuse a packing that changes what this configuration's network sees (beyond float16 rounding with
    ``half``: relative 5e-4 of the referenced QSM and of FLAIR, finer than the bfloat16 the network computes in
    on a GPU). Checks this configuration's input level only; the tests check every level."""
    spec = config.input_spec()
    a, b = spec.network_inputs(raw, reference), spec.network_inputs(packed, reference)
    same = np.allclose(a, b, rtol=2e-3, atol=1e-3) if half else np.array_equal(a, b)
    if not same:
        raise RuntimeError("packed patches change the network inputs")


def save_arrays(path: Path, lesions: LesionSet, column: str, margin_mm: float, half: bool = False) -> None:
    """The lesion set as one compressed .npz; ``half`` stores the packed patches as float16 (half the size)."""
    arrays = {name: getattr(lesions, name) for name in FIELDS}
    arrays["patches"] = pack_patches(lesions.patches, margin_mm)
    if half:  # QSM relative to the lesion's own reference, so float16 rounds what the network reads, not ppb
        patches, ref = arrays["patches"], np.asarray(lesions.reference, np.float32)
        med, scale = ref[:, 0, None, None, None], ref[:, 1, None, None, None]
        sd, other = patches[:, 2], patches[:, 3] > 0.5
        keep = read_mask(sd, other, margin_mm)  # outside it QSM is never read
        patches[:, 0] = np.where(keep, (patches[:, 0] - med) / scale, 0.0)
        arrays["patches"] = patches.astype(np.float16)
    np.savez_compressed(path, **arrays, feature_names=np.asarray(lesions.feature_names), column=np.asarray(column),
                        margin_mm=np.asarray(margin_mm))


def load_arrays(path: Path) -> tuple[LesionSet, str, float]:
    with np.load(path, allow_pickle=False) as z:
        fields = {name: z[name] for name in FIELDS}
        if fields["patches"].dtype == np.float16:  # back to ppb (save_arrays' half)
            patches, ref = fields["patches"].astype(np.float32), fields["reference"].astype(np.float32)
            patches[:, 0] = patches[:, 0] * ref[:, 1, None, None, None] + ref[:, 0, None, None, None]
            fields["patches"] = patches
        lesions = LesionSet(**fields, feature_names=z["feature_names"].tolist())
        return lesions, str(z["column"]), float(z["margin_mm"])


def paper_config(lesions: LesionSet, column: str, **overrides) -> TrainConfig:
    """The paper's protocol (`--protocol paper`) with one fold per family (leave one family out; the command
    line's `--cv-group-by family` would need `--folds` set to the number of families for that)."""
    n_groups = int(np.unique(lesions.groups).size)
    base = dict(folds=n_groups, fold_groups_by=column, checkpoint=False, weights_fp16=True, device="auto")
    return protocol_config("paper", **{**base, **overrides})


def pack(args: argparse.Namespace) -> int:
    from qsmrim_app.workflows.training import collect_lesion_set, with_fold_groups

    lesions = collect_lesion_set(Path(args.output_dir))
    if lesions is None:
        raise SystemExit(f"no annotated lesions under {args.output_dir}")
    lesions, _ = with_fold_groups(lesions, TrainConfig(), Path(args.bids), args.column)
    config = paper_config(lesions, args.column)
    save_arrays(Path(args.out), lesions, args.column, config.margin_mm, args.float16)
    packed, _, _ = load_arrays(Path(args.out))
    check_packed(lesions.patches, packed.patches, lesions.reference, config, args.float16)
    summary = lesions.summary()
    print(json.dumps({"out": str(args.out), "bytes": Path(args.out).stat().st_size, **summary}))
    return 0


# ---- training (worker processes share the device) ----
def run_worker(args: argparse.Namespace) -> int:
    """Train this worker's members in order; one JSON line per member (or skip) appended to ``--log``."""
    import torch

    from qsmrim_app.model.cv import cv_folds, train_members, with_data_grid

    torch.set_num_threads(args.threads)
    lesions, column, _ = load_arrays(Path(args.arrays))
    config = paper_config(lesions, column, **json.loads(args.overrides))
    last = args.member_estimate  # then each member's own time
    folds = cv_folds(lesions, with_data_grid(config, lesions))
    for item in args.members.split(","):
        k, s = (int(v) for v in item.split(":"))
        start = time.time()
        if start + last > args.deadline:  # this member would not finish before the deadline
            rec = {"fold": k, "seed": s, "skipped": True}
        else:
            prob = train_members(lesions, config, Path(args.out_dir), [(k, s)])[(k, s)]
            save_heldout(Path(args.out_dir), k, s, folds[k][1], prob, lesions)
            elapsed = time.time() - start
            last = max(elapsed, last)  # the slowest so far (or the estimate) decides the next start
            rec = {"fold": k, "seed": s, "seconds": round(elapsed, 1), "pid": os.getpid()}
        with open(args.log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    return 0


def save_heldout(out_dir: Path, fold: int, seed: int, index: np.ndarray, probability: np.ndarray,
                 lesions: LesionSet) -> Path:
    """One member's held-out probabilities with the lesions' indices in the packed arrays and their keys
    (subject, session, lesion id, checked by ``score``): what ``score`` reads when the run stopped before a whole
    seed (the per-family figures need only that family's member)."""
    path = out_dir / "heldout" / f"fold{fold}_seed{seed}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    index = np.asarray(index, np.int64)
    np.savez(path, fold=fold, seed=seed, index=index, probability=np.asarray(probability, np.float64),
             subjects=lesions.subjects[index].astype(str), sessions=lesions.sessions[index].astype(str),
             lesion_ids=lesions.lesion_ids[index])
    return path


def complete_seeds(done: set[tuple[int, int]], folds: int, seeds: int) -> int:
    """How many leading seeds have every fold trained (what a deadline leaves a whole ensemble of)."""
    m = 0
    while m < seeds and all((k, m) in done for k in range(folds)):
        m += 1
    return m


def choose_memory_format(config: TrainConfig, n_lesions: int, n_features: int, choice: str) -> dict:
    """Set the training layout for this process and its workers (``loop.training_memory_format``): ``on``,
    ``off``, or ``auto``: on a GPU time the trainer's own steps both ways and keep the faster (the layout
    changes speed, not results); off on a CPU."""
    from qsmrim_app.model.loop import CHANNELS_LAST_ENV
    from qsmrim_app.model.predict import resolve_device
    from qsmrim_app.model.train import estimate_training_seconds

    on_gpu = resolve_device(config.device).type == "cuda"
    if choice != "auto" or not on_gpu:
        os.environ[CHANNELS_LAST_ENV] = "1" if choice == "on" else "0"
        return {"channels_last": choice == "on" and on_gpu,
                "chosen_by": choice if on_gpu or choice == "off" else "not a GPU"}
    per_step = {}
    for flag in ("0", "1"):
        os.environ[CHANNELS_LAST_ENV] = flag
        per_step[flag] = estimate_training_seconds(config, n_lesions, n_features, 10)["seconds_per_step"]
    best = min(per_step, key=per_step.get)
    os.environ[CHANNELS_LAST_ENV] = best
    return {"channels_last": best == "1", "chosen_by": "timed", "seconds_per_step_default": per_step["0"],
            "seconds_per_step_channels_last": per_step["1"]}


def train_paper(args: argparse.Namespace) -> int:
    import torch

    from qsmrim_app.model.methods import select_features
    from qsmrim_app.model.train import estimate_training_seconds, train

    t0 = time.time()
    lesions, column, margin = load_arrays(Path(args.arrays))
    overrides = {k: v for k, v in dict(epochs=args.epochs, width_multiplier=args.width, seeds=args.seeds,
                                       device=args.device).items() if v is not None}
    config = paper_config(lesions, column, **overrides)
    if abs(config.margin_mm - margin) > 1e-6:
        raise SystemExit(f"the arrays were packed for a {margin} mm margin, the configuration reads {config.margin_mm}")
    out_dir = Path(args.out_dir)
    members = [(k, s) for s in range(config.seeds) for k in range(config.folds)]  # seed-major
    deadline = t0 + args.deadline_s
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Worker processes (not multiprocessing: a spawned child re-imports its parent's main module, e.g. pytest)
    # take every args.workers-th member of the seed-major list, so seed 0 finishes first.
    # A member's time before any has run: a few timed steps, times the workers that time-slice the device.
    n_features = select_features(lesions, config).values.shape[1]
    layout = choose_memory_format(config, len(lesions), n_features, args.channels_last)
    est = estimate_training_seconds(config, len(lesions), n_features, 3)
    member_estimate = est["seconds"] / max(est["members"], 1) * min(args.workers, len(members))
    procs, logs = [], []
    for w in range(args.workers):
        mine = members[w::args.workers]
        if not mine:
            continue
        logs.append(out_dir / f"worker{w}.jsonl")
        logs[-1].unlink(missing_ok=True)
        procs.append(subprocess.Popen([
            sys.executable, str(Path(__file__).resolve()), "worker", "--arrays", str(args.arrays),
            "--out-dir", str(out_dir), "--members", ",".join(f"{k}:{s}" for k, s in mine),
            "--deadline", repr(deadline), "--threads", str(threads), "--overrides", json.dumps(overrides),
            "--log", str(logs[-1]), "--member-estimate", repr(member_estimate)]))
    try:
        failed = [w for w, p in enumerate(procs) if p.wait() != 0]
    finally:  # an interrupted parent leaves no worker on the device
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    if failed:
        raise SystemExit(f"worker(s) {failed} failed (their output is above; logs in {out_dir})")
    records = [json.loads(line) for log in logs if log.is_file() for line in log.read_text().splitlines()]
    done = {(r["fold"], r["seed"]) for r in records if not r.get("skipped")}
    m = complete_seeds(done, config.folds, config.seeds)
    trained_s = time.time() - t0
    model_dir = None
    if m:
        model_dir = train(lesions, replace(config, seeds=m), out_dir, progress=False)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "workers": args.workers, "threads_per_worker": threads,
        "config": {k: v for k, v in config.to_dict().items() if k in (
            "protocol", "epochs", "batch_size", "learning_rate", "width_multiplier", "folds", "seeds",
            "input_level", "feature_set", "fold_groups_by", "deepsmote", "augment")},
        "lesions": lesions.summary(), "members_planned": len(members), "members_trained": len(done),
        "seeds_complete": m, "model_dir": str(model_dir) if model_dir else None,
        "member_estimate_s": round(member_estimate, 1), "layout": layout,
        "member_seconds": sorted(records, key=lambda r: (r["seed"], r["fold"])),
        "training_wall_s": round(trained_s, 1), "total_wall_s": round(time.time() - t0, 1),
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "members_trained", "seeds_complete", "total_wall_s")}))
    return 0 if m else 1


def read_heldout(out_dir: Path, lesions: LesionSet, column: str) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Every finished member's (held-out indices, probabilities), by (fold, seed); refused unless the indices
    are the held-out lesions of that fold of these arrays (and, where stored, name the same lesions)."""
    from qsmrim_app.model.cv import cv_folds, with_data_grid

    folds = cv_folds(lesions, with_data_grid(paper_config(lesions, column), lesions))
    out = {}
    for path in sorted((Path(out_dir) / "heldout").glob("fold*_seed*.npz")):
        with np.load(path) as z:
            k, index = int(z["fold"]), z["index"]
            same = k < len(folds) and np.array_equal(index, folds[k][1])
            if same and "subjects" in z.files:
                same = (np.array_equal(z["subjects"], lesions.subjects[index].astype(str))
                        and np.array_equal(z["sessions"], lesions.sessions[index].astype(str))
                        and np.array_equal(z["lesion_ids"], lesions.lesion_ids[index]))
            if not same:
                raise SystemExit(f"{path} does not hold fold {k}'s held-out lesions of these arrays (made from "
                                 "another corpus or packing?)")
            out[(k, int(z["seed"]))] = (index, z["probability"])
    return out


def reference_tables(path: Path) -> "dict[str, pd.DataFrame]":
    """Other methods' out-of-family probabilities, by name: a model's ``oof_predictions.tsv`` (one, named
    ``reference``) or bench_lofo_models.py's ``--predictions`` table (one per ``method``, its raw probability)."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str}, keep_default_na=False)
    table["session"] = table["session"].replace("n/a", "")  # "no session", as the model directory writes it
    if "method" not in table.columns:
        tables = {"reference": table}
    else:
        if "probability_raw" in table.columns:  # the ranking, not the calibrated probability
            table = table.drop(columns="probability").rename(columns={"probability_raw": "probability"})
        tables = {str(m): t for m, t in table.groupby("method", sort=False)}
    for name, t in tables.items():
        if t.duplicated(["subject", "session", "lesion_id"]).any():
            raise SystemExit(f"{path}: {name} has more than one row for some (subject, session, lesion_id)")
    return tables


def _aligned(lesions: LesionSet, name: str, table: "pd.DataFrame") -> np.ndarray:
    """``table``'s probability for every lesion of the packed arrays (NaN where it has none); refused where a
    lesion it holds has another label."""
    keys = table.assign(lesion_id=table["lesion_id"].astype(int)).set_index(["subject", "session", "lesion_id"])
    rows = keys.reindex(list(zip(lesions.subjects.astype(str), lesions.sessions.astype(str),
                                 lesions.lesion_ids.astype(int))))
    held = rows["label"].notna().to_numpy()
    if not held.any() or (rows["label"].to_numpy(float)[held] != lesions.labels[held]).any():
        raise SystemExit(f"the {name} table does not hold these lesions with these labels")
    return np.where(held, rows["probability"].to_numpy(float), np.nan)


def score_heldout(lesions: LesionSet, heldout: dict, references: "dict[str, pd.DataFrame]", n_boot: int,
                  control_base: str | None = None) -> list[dict]:
    """Per left-out family (fold): ROC / PR AUC of the mean of its finished seeds and, for every reference
    method (out-of-family probabilities of the same lesions), that method's on the same lesions, the paired
    participant bootstrap of the PR AUC difference (paper minus method), and the equal-weight mean of the two
    rankings within the family (nothing fitted) with its gain over the method alone. ``control_base``: also the
    rank mean of that method with each other one (``controls``), so that what averaging any second ranking
    gives is not credited to the paper's network. Ranking only: a partial run has no calibration map."""
    from scipy.stats import rankdata

    from qsmrim_app.model.metrics import paired_bootstrap, pr_auc, roc_auc

    by_fold: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for (k, _), item in sorted(heldout.items()):
        by_fold.setdefault(k, []).append(item)
    refs = {name: _aligned(lesions, name, table) for name, table in references.items()}
    rows = []
    for k, items in sorted(by_fold.items()):
        index = items[0][0]
        if any(not np.array_equal(i, index) for i, _ in items):
            raise SystemExit(f"fold {k}: members disagree on the held-out lesions")
        y, p = lesions.labels[index], np.mean([q for _, q in items], axis=0)
        row = {"fold": k, "family": ",".join(map(str, np.unique(lesions.groups[index]))), "seeds": len(items),
               "n_lesions": int(index.size), "n_rimplus": int(y.sum()), "roc_auc": roc_auc(y, p),
               "pr_auc": pr_auc(y, p), "compared": {}}
        for name, p_all in refs.items():
            p_ref = p_all[index]
            if np.isnan(p_ref).any():
                continue  # the table lacks some of this family's lesions: no comparison on a subset
            boot = paired_bootstrap(y, p, p_ref, lesions.subjects[index], n_boot=n_boot)
            both = rankdata(p) + rankdata(p_ref)  # equal weights, nothing fitted: does the paper net add to it?
            added = paired_bootstrap(y, both, p_ref, lesions.subjects[index], n_boot=n_boot)
            row["compared"][name] = {"roc_auc": roc_auc(y, p_ref), "pr_auc": pr_auc(y, p_ref),
                                     "pr_auc_difference": boot["pr_auc"],
                                     "rank_mean_with_paper": {"pr_auc": pr_auc(y, both), "roc_auc": roc_auc(y, both),
                                                              "pr_auc_gain": added["pr_auc"]}}
        if control_base is not None and control_base in row["compared"]:
            base = refs[control_base][index]
            row["controls"] = {name: {"with": control_base, "pr_auc": pr_auc(y, rankdata(base) + rankdata(p_all[index]))}
                               for name, p_all in refs.items()
                               if name != control_base and not np.isnan(p_all[index]).any()}
        rows.append(row)
    return rows


def _finite(obj):
    """JSON without NaN (an AUC of a family without rim+ lesions is undefined): None instead."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def score(args: argparse.Namespace) -> int:
    lesions, column, _ = load_arrays(Path(args.arrays))
    heldout = read_heldout(Path(args.out_dir), lesions, column)
    if not heldout:
        raise SystemExit(f"no held-out predictions under {args.out_dir}/heldout")
    references = reference_tables(Path(args.reference)) if args.reference else {}
    rows = score_heldout(lesions, heldout, references, args.n_boot, args.control_base)
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "members": sorted(f"fold{k}_seed{s}" for k, s in heldout), "reference": args.reference, "families": rows}
    Path(args.json).write_text(json.dumps(_finite(result), indent=1) + "\n")
    for r in rows:
        print(f"{r['family']:>16}  paper PR {r['pr_auc']:.3f} ROC {r['roc_auc']:.3f}  " + "  ".join(
            f"{m} {c['pr_auc']:.3f} ({c['pr_auc_difference']['ci_low']:+.3f}, {c['pr_auc_difference']['ci_high']:+.3f})"
            for m, c in r["compared"].items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="the training lesions of a participant-level output, as one .npz")
    p.add_argument("--output-dir", required=True, help="participant-level output with annotations")
    p.add_argument("--bids", required=True, help="the BIDS dataset whose participants.tsv holds --column")
    p.add_argument("--column", default="family")
    p.add_argument("--out", required=True)
    p.add_argument("--float16", action="store_true",
                   help="store the patches as float16 (to fit a size limit; the check allows its rounding)")
    t = sub.add_parser("train", help="the paper's protocol, one fold per family, in worker processes")
    t.add_argument("--arrays", required=True)
    t.add_argument("--out-dir", required=True, help="the model directory (weights stay here)")
    t.add_argument("--workers", type=int, default=1,
                   help="processes that share the device (1 on a GPU, where a step is compute-bound; several on "
                        "a many-core CPU)")
    t.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="start no member expected to end later than this many seconds after the start (the "
                        "expectation: timed steps, then each worker's slowest member); no hard stop")
    t.add_argument("--json", required=True, help="timings and what was trained")
    t.add_argument("--epochs", type=int, default=None, help="(smoke tests) instead of the paper's 40")
    t.add_argument("--width", type=float, default=None, help="(smoke tests) instead of the paper's 1.0")
    t.add_argument("--seeds", type=int, default=None, help="instead of the paper's 3")
    t.add_argument("--device", default=None, help="auto (default), cuda or cpu")
    t.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="train in the channels-last layout on a GPU (auto: time both, keep the faster)")
    c = sub.add_parser("score", help="per left-out family, the finished members (a partial run too)")
    c.add_argument("--arrays", required=True)
    c.add_argument("--out-dir", required=True, help="train's --out-dir (its heldout/ folder)")
    c.add_argument("--reference", help="other methods on the same lesions: a model's oof_predictions.tsv or "
                                       "bench_lofo_models.py's --predictions table")
    c.add_argument("--n-boot", type=int, default=2000)
    c.add_argument("--control-base", help="a method of --reference: also its rank mean with every other method "
                                          "(what averaging two rankings gives without the paper's network)")
    c.add_argument("--json", required=True)
    w = sub.add_parser("worker", help="(internal) one worker process of train")
    for name in ("--arrays", "--out-dir", "--members", "--overrides", "--log"):
        w.add_argument(name, required=True)
    w.add_argument("--deadline", type=float, required=True)
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--member-estimate", type=float, default=0.0)
    args = parser.parse_args(argv)
    return {"pack": pack, "train": train_paper, "worker": run_worker, "score": score}[args.step](args)


if __name__ == "__main__":
    raise SystemExit(main())
