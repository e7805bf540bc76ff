"""Inference speed of the full 5-fold x 3-seed ensemble: lesions per second.

Builds ensembles with the real training code (0 epochs: initial weights; the weights'
values do not change the cost; 20 lesions of 10 subjects keep that step short), at the paper's width (1.0) and at the bundled model's width, then
times ``Ensemble.predict`` on 100 lesions, and the bundled model itself when it is present.
Writes ``benchmarks/results/inference.json``.

    python benchmarks/bench_inference.py [--device cpu|cuda|auto] [--lesions 100]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def lesion_set(n: int, n_features: int, seed: int):
    from qsmrim_app.model.data import LesionSet

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    labels[:4] = 1
    return LesionSet(patches=rng.normal(size=(n, 4, 32, 32, 16)).astype(np.float32),
                     features=rng.normal(size=(n, n_features)).astype(np.float32),
                     feature_names=[f"original_firstorder_f{i}" for i in range(n_features)], labels=labels,
                     subjects=np.array([f"sub-{i % 10:02d}" for i in range(n)]), lesion_ids=np.arange(1, n + 1))


def time_predict(model_dir: Path, device: str, n_lesions: int, repeats: int = 3) -> dict:
    from qsmrim_app.model.predict import load_ensemble

    start = time.perf_counter()
    ensemble = load_ensemble(model_dir, device=device)
    load_s = time.perf_counter() - start
    meta = json.loads((model_dir / "model.json").read_text())
    names = meta["feature_names"]
    data = lesion_set(n_lesions, max(len(names), 1), seed=1)
    feats = data.features[:, : len(names)]
    ensemble.predict(data.patches[:8], feats[:8], names)  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        ensemble.predict(data.patches, feats, names)
        runs.append(time.perf_counter() - start)
    best = min(runs)
    return {"members": len(meta["members"]), "width_multiplier": meta["config"]["width_multiplier"],
            "load_seconds": round(load_s, 3), "predict_seconds_best": round(best, 3),
            "predict_seconds_all": [round(r, 3) for r in runs], "lesions_per_second": round(n_lesions / best, 1),
            "weights_mb": round(sum(p.stat().st_size for p in (model_dir / "weights").iterdir()) / 2**20, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lesions", type=int, default=100)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0],
                        help="network widths of the 5x3 ensembles to time (1.0 = the paper's ResNet-18)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args(argv)

    from qsmrim_app.config import BUNDLED_MODEL_DIR
    from qsmrim_app.model.config import TrainConfig
    from qsmrim_app.model.train import train

    record = {"device": args.device, "lesions": args.lesions, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "torch": torch.__version__, "python": platform.python_version(), "ensembles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(epochs=0, folds=5, seeds=3, batch_size=32, augment=False, device=args.device,
                           checkpoint=False)
        for width in args.widths:
            model_dir = Path(tmp) / f"w{width}"
            train(lesion_set(20, 527, seed=0), replace(base, width_multiplier=width), model_dir, progress=False)
            record["ensembles"][f"qsmrimnet_width_{width}"] = time_predict(model_dir, args.device, args.lesions)
            print(width, record["ensembles"][f"qsmrimnet_width_{width}"], flush=True)
    if (BUNDLED_MODEL_DIR / "model.json").is_file():
        record["ensembles"]["bundled"] = time_predict(BUNDLED_MODEL_DIR, args.device, args.lesions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
