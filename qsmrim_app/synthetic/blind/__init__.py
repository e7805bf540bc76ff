"""The blind family: semi-real QSM + FLAIR datasets with annotated rim+ / rim- MS lesions.

Built from docs/blind_family_spec.md alone (issue 18): real susceptibility backgrounds (COSMOS and two
haemorrhage patients), real Ljubljana lesion shapes carried into white matter, rims and confounders
rendered by fine sub-sampling, a dipole field with noise and a linear inversion for most participants,
synthetic FLAIR and magnitude, labels from the consensus rule judged on the simulated QSM grid.
Every choice and its distribution: docs/blind_family.md.
"""
from __future__ import annotations

from pathlib import Path

from .participant import simulate
from .writer import lesion_table, truth_dir, write_dataset_files, write_family_tables, write_participant

__all__ = ["generate_blind_family", "simulate", "truth_dir"]


def generate_blind_family(out_dir: Path | str, data_dir: Path | str, n_participants: int, seed: int,
                          small: bool = False) -> Path:
    """Write ``n_participants`` participants (b001...) as a BIDS dataset in ``out_dir``; truth in
    ``<out_dir>_truth/``. ``small``: a 36-44 mm slab with 6-9 lesions (fast tests)."""
    out_dir = Path(out_dir)
    if n_participants < 1:
        raise ValueError("n_participants must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_files(out_dir, seed)
    params, tables = [], []
    for index in range(1, n_participants + 1):
        part = simulate(seed, index, str(data_dir), small=small)
        write_participant(out_dir, part, seed)
        params.append(part.params)
        tables.append(lesion_table(part.lesions))
    write_family_tables(out_dir, params, tables)
    return out_dir
