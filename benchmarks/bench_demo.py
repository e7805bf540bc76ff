"""What `make demo` finds: the bundled model's rim+ counts beside the example's truth, per participant.

Runs the demo's three commands through the command line (qsmrim-synth with the Makefile's arguments,
participant level, group level), once per operating point (one work directory: only the classification
is redone), then compares the outputs with the generator's truth (`<bids>_truth/`): counts per
participant, the group level's agreement (group_agreement.json), and lesion-level ROC/PR AUC of the
probabilities against the example's rim annotations. Writes ``benchmarks/results/demo.json``; the
figures of docs/demo.md come from it.

    python benchmarks/bench_demo.py [--nprocs 1] [--keep DIR] [--out benchmarks/results/demo.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

REPO = Path(__file__).resolve().parent.parent
SYNTH_ARGS = ["--subjects", "3", "--seed", "1", "--rimplus-fraction", "0.3"]  # as the Makefile's demo
OPERATING_POINTS = ("f1", "high-sensitivity")


def run(*args: str) -> float:
    """Run a console command of this checkout; return its wall time (s); fail loudly with its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return round(time.perf_counter() - start, 1)


def lesions_with_truth(out: Path) -> pd.DataFrame:
    """Every lesion's probability and call beside the rim annotation the example ships."""
    from qsmrim_app import derivatives as drv

    frames = []
    for unit, path in sorted(drv.find_units(out, "rim_lesions").items(), key=lambda kv: kv[1]):
        model = drv.read_tsv(path)[["lesion_id", "probability", "rim_positive"]]
        rater = drv.read_tsv(drv.output_path(out, unit, "annotations"))[["lesion_id", "rim_positive"]]
        both = model.merge(rater, on="lesion_id", suffixes=("_model", "_truth"))
        both.insert(0, "participant_id", unit.participant_id)
        frames.append(both)
    return pd.concat(frames, ignore_index=True)


def summarise(out: Path, truth: pd.DataFrame) -> dict:
    from qsmrim_app import derivatives as drv

    counts = drv.read_tsv(out / "group_rimcounts.tsv")[["participant_id", "n_lesions", "n_rimplus", "threshold"]]
    counts = counts.merge(truth[["participant_id", "n_rimplus"]].rename(columns={"n_rimplus": "n_rimplus_truth"}),
                          on="participant_id")
    lesions = lesions_with_truth(out)
    y, p = lesions["rim_positive_truth"].astype(int), lesions["probability"].astype(float)
    ranked_above = 0  # truth rim+ lesions above every rim- lesion of their participant
    top_rimminus = {}
    for participant, group in lesions.groupby("participant_id"):
        top_negative = group.loc[group["rim_positive_truth"] == 0, "probability"].max()
        top_rimminus[participant] = round(float(top_negative), 4)
        ranked_above += int((group.loc[group["rim_positive_truth"] == 1, "probability"] > top_negative).sum())
    return {
        "per_participant": counts.to_dict(orient="records"),
        "agreement": json.loads((out / "group_agreement.json").read_text()),
        "lesions": {"n": int(len(lesions)), "rimplus_truth": int(y.sum()),
                    "roc_auc": round(float(roc_auc_score(y, p)), 4),
                    "pr_auc": round(float(average_precision_score(y, p)), 4),
                    "rimplus_above_every_rimminus_of_their_participant": ranked_above,
                    "highest_rimminus_probability": top_rimminus,
                    "rimplus_probabilities": lesions.loc[y == 1, ["participant_id", "lesion_id", "probability"]]
                    .round(4).to_dict(orient="records")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the example (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo.json")
    args = parser.parse_args(argv)
    from qsmrim_app.config import BUNDLED_MODEL_DIR

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        bids = root / "bids"
        result: dict = {"command": " ".join(["python", "benchmarks/bench_demo.py", *(argv or sys.argv[1:])]),
                        "synth_args": SYNTH_ARGS, "nprocs": args.nprocs, "machine": platform.node(),
                        "model_id": json.loads((Path(BUNDLED_MODEL_DIR) / "model.json").read_text())["model_id"],
                        "wall_s": {}}
        result["wall_s"]["synth"] = run("-m", "qsmrim_app.synthetic", str(bids), *SYNTH_ARGS)
        truth = pd.read_csv(root / "bids_truth" / "subjects.tsv", sep="\t")
        result["truth"] = truth[["participant_id", "n_lesions", "n_rimplus"]].to_dict(orient="records")
        for point in OPERATING_POINTS:
            out = root / "derivatives" / point
            result["wall_s"][f"participant_{point}"] = run(
                "run.py", str(bids), str(out), "participant", "--nprocs", str(args.nprocs), "-w", str(root / "work"),
                "--operating-point", point)
            result["wall_s"][f"group_{point}"] = run("run.py", str(bids), str(out), "group")
            result[point] = summarise(out, truth)
            rows = result[point]["per_participant"]
            print(f"{point}: model {[r['n_rimplus'] for r in rows]} vs truth {[r['n_rimplus_truth'] for r in rows]}; "
                  f"lesion ROC AUC {result[point]['lesions']['roc_auc']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
