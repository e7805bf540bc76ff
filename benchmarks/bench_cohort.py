"""Cohort throughput on one machine: 4 participants in 4 separate calls vs. in one call (both --nprocs 2).

Same machine, same run, same generated participants (small phantoms), fresh work dirs for each arm.
Also measured: peak memory of each call (sum of the resident memory of the whole process tree,
sampled every 0.2 s, and the largest single process), the per-node peak memory the scheduler
recorded, the unit-mistake case (a ppb map declared ppm: refused before pyradiomics), and whether
the two arms' outputs agree under scripts/compare_derivatives.py. Writes benchmarks/results/cohort.json.

    python benchmarks/bench_cohort.py [--participants 4] [--nprocs 2] [--out benchmarks/results/cohort.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


def _tree_rss_kb(root: int) -> tuple[float, float]:
    """(sum, max) resident memory in kB of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(statm[1]) * PAGE_KB
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    values = [rss.get(pid, 0.0) for pid in seen]
    return float(sum(values)), float(max(values, default=0.0))


def run_measured(args: list[str]) -> dict:
    """Run a command; wall time, exit code and peak memory of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = {"sum": 0.0, "max": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            total, largest = _tree_rss_kb(proc.pid)
            peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    sampler.join()
    return {"wall_s": round(time.perf_counter() - start, 2), "exit": proc.returncode,
            "peak_tree_gb": round(peak["sum"] / 1024**2, 3), "peak_process_gb": round(peak["max"] / 1024**2, 3),
            "stderr_tail": stderr.splitlines()[-3:]}


def node_memory(work: Path) -> dict[str, float]:
    """Largest measured peak per node name (over units) from the scheduler's node_memory.tsv."""
    path = work / "node_memory.tsv"
    found: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines()[1:]:
            name, gb = line.split("\t")
            node = name.rsplit(".", 1)[-1]
            found[node] = round(max(found.get(node, 0.0), float(gb)), 3)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cohort.json")
    args = parser.parse_args(argv)

    from compare_derivatives import compare_trees

    from qsmrim_app.synthetic import generate_dataset

    app = [sys.executable, str(REPO / "run.py")]
    labels = [f"{i:02d}" for i in range(1, args.participants + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bids = tmp / "bids"
        generate_dataset(bids, n_subjects=args.participants, seed=args.seed, size="small")
        load_before = os.getloadavg()

        separate = []
        for label in labels:  # one call per participant, one after another (what a loop in a script does)
            separate.append(run_measured([*app, str(bids), str(tmp / "out_separate"), "participant",
                                          "--participant-label", label, "--nprocs", str(args.nprocs),
                                          "-w", str(tmp / "work_separate")]))
            print(f"separate sub-{label}: {separate[-1]['wall_s']} s", flush=True)
        one = run_measured([*app, str(bids), str(tmp / "out_one"), "participant", "--nprocs", str(args.nprocs),
                            "-w", str(tmp / "work_one")])
        print(f"one call: {one['wall_s']} s", flush=True)
        problems, compared = compare_trees(tmp / "out_separate", tmp / "out_one")

        # the commonest unit mistake: a map stored in ppb, declared ppm (x1000 again)
        mistake = tmp / "mistake"
        generate_dataset(mistake, n_subjects=1, seed=args.seed + 1, size="small")
        qsm = mistake / "sub-01" / "anat" / "sub-01_Chimap.nii.gz"
        image = nib.load(qsm)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj, np.float32) * 1000, image.affine, image.header), qsm)
        wrong_units = run_measured([*app, str(mistake), str(tmp / "out_mistake"), "participant",
                                    "--nprocs", str(args.nprocs), "-w", str(tmp / "work_mistake")])
        load_after = os.getloadavg()

        separate_s = sum(r["wall_s"] for r in separate)
        result = {
            "what": f"{args.participants} small phantom participants, --nprocs {args.nprocs}: separate calls "
                    "one after another vs one call",
            "command_separate": f"qsmrim bids out participant --participant-label XX --nprocs {args.nprocs} -w work  (x{args.participants})",
            "command_one": f"qsmrim bids out participant --nprocs {args.nprocs} -w work",
            "separate_calls": separate,
            "separate_total_s": round(separate_s, 2),
            "one_call": one,
            "speedup_one_call": round(separate_s / one["wall_s"], 2),
            "outputs_equal": not problems,
            "files_compared": compared,
            "differences": problems[:20],
            "node_peak_memory_gb": node_memory(tmp / "work_one"),
            "unit_mistake_ppb_declared_ppm": {**wrong_units, "refused": wrong_units["exit"] == 1 and any(
                "--qsm-units ppb" in line for line in wrong_units["stderr_tail"])},
            "peak_memory_normal_participant_gb": max(r["peak_tree_gb"] for r in separate),
            "host": platform.node(), "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("separate_calls", "one_call")}, indent=2))
    return 0 if result["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
