"""The group level: gather every participant's outputs into one table and report; ``--train`` trains.

It reads only the participant-level derivatives (and the list of participants in the raw dataset, so
that participants without outputs are listed rather than silently dropped). Rerunning it rewrites
the same files with the same content.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .. import derivatives as drv
from ..config import AppConfig

LOGGER = logging.getLogger("qsmrim")

GROUP_TABLE = "group_rimcounts.tsv"
GROUP_REPORT = "group_report.html"
GROUP_COLUMNS = ["participant_id", "session", "n_lesions", "n_rimplus", "lesion_volume_mm3",
                 "rimplus_volume_mm3", "model_id", "threshold", "operating_point",
                 "n_rimplus_expected", "n_rimplus_ci_low", "n_rimplus_ci_high", "calibration"]  # model/counts.py
# Where outputs are found lives in derivatives.py (training.py needs it too; no import circle).
find_units = drv.find_units


def expected_participants(config: AppConfig) -> list[str]:
    """Participants of the raw dataset (and the selection) that should have outputs."""
    labels = sorted(p.name[4:] for p in Path(config.bids_dir).glob("sub-*") if p.is_dir())
    if config.participant_labels:
        labels = [label for label in labels if label in set(config.participant_labels)]
    return labels


def build_group_table(config: AppConfig) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    summaries = find_units(config.output_dir, "summary")
    rows = [drv.read_tsv(path) for _, path in sorted(summaries.items(), key=lambda kv: (kv[0].subject, kv[0].session or ""))]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=GROUP_COLUMNS)
    table = table.reindex(columns=GROUP_COLUMNS)
    table["session"] = table["session"].fillna("n/a")
    table = table.drop_duplicates(subset=["participant_id", "session"], keep="last")
    table = table.sort_values(["participant_id", "session"]).reset_index(drop=True)
    done = {unit.subject for unit in summaries}
    logs = drv.latest_unit_logs(config.output_dir)
    failed = [(f"sub-{label}", _failure_reason(config, label, logs)) for label in expected_participants(config)
              if label not in done]
    # A unit that was complete before and failed on a later run keeps its earlier outputs (they are in
    # the table); its latest failure is listed too, so it is not mistaken for an up-to-date result.
    for unit in sorted(summaries, key=lambda u: (u.subject, u.session or "")):
        record = logs.get(unit.prefix)
        if record and record["status"] == "failed":
            failed.append((unit.prefix, f"latest participant run failed ({record.get('error', '?')}; log: "
                                        f"{record['log_file']}); the outputs of its earlier complete run are kept"))
    return table, failed


def _failure_reason(config: AppConfig, label: str, logs: dict[str, dict]) -> str:
    errors = [f"{prefix}: {record.get('error', '?')} (log: {record['log_file']})"
              for prefix, record in sorted(logs.items())
              if record["status"] == "failed" and (prefix == f"sub-{label}" or prefix.startswith(f"sub-{label}_ses-"))]
    if errors:
        return "participant level failed: " + "; ".join(errors)
    crash_dirs = sorted((Path(config.work_dir) / "crashes").glob(f"sub-{label}*")) if config.work_dir else []
    crashes = [c for d in crash_dirs for c in d.glob("crash-*")]
    if crashes:
        return f"participant level failed (crash report: {crashes[0]})"
    return "no participant-level outputs (not run, failed, or skipped for input problems: see its log)"


def expert_counts(output_dir: Path) -> pd.DataFrame:
    """Expert rim+ count per unit, from the annotation tables of the participant level."""
    rows = []
    for unit, path in find_units(output_dir, "annotations").items():
        labels = drv.read_tsv(path)["rim_positive"]
        rows.append({"participant_id": unit.participant_id, "session": unit.session or "n/a",
                     "n_rimplus_expert": int(np.nansum(labels.to_numpy(dtype=float)))})
    return pd.DataFrame(rows, columns=["participant_id", "session", "n_rimplus_expert"])


def lesion_probabilities(output_dir: Path) -> pd.DataFrame:
    frames = []
    for unit, path in sorted(find_units(output_dir, "rim_lesions").items(), key=lambda kv: kv[1]):
        table = drv.read_tsv(path)[["lesion_id", "probability"]]
        table.insert(0, "session", unit.session or "n/a")
        table.insert(0, "participant_id", unit.participant_id)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["participant_id", "session", "lesion_id", "probability"])
    return pd.concat(frames, ignore_index=True)


def run_group(config: AppConfig) -> int:
    output_dir = Path(config.output_dir)
    drv.init_output_dir(output_dir, config.bids_dir)
    drv.write_run_log(output_dir, "group", config.command_line, {"train": config.train}, label="group")
    if config.train:
        from .training import train_from_derivatives

        return train_from_derivatives(config)
    if config.recalibrate:
        from .recalibrate import run_recalibration

        return run_recalibration(config)

    table, failed = build_group_table(config)
    if table.empty:
        LOGGER.error("no participant-level outputs (*_desc-rim_summary.tsv) under %s: run the participant "
                     "level first (with a model, so lesions are classified)", output_dir)
        return 1
    drv.write_tsv(output_dir / GROUP_TABLE, table)
    drv.write_json(drv.sidecar_path(output_dir / GROUP_TABLE),
                   {k: v for k, v in drv.SUMMARY_DICTIONARY.items() if k in GROUP_COLUMNS})

    agreement = None
    experts = expert_counts(output_dir)
    merged = table.merge(experts, on=["participant_id", "session"], how="inner")
    if len(merged) >= 3:
        from ..model.metrics import count_agreement

        agreement = dict(count_agreement(merged["n_rimplus"].to_numpy(float),
                                         merged["n_rimplus_expert"].to_numpy(float)))
        agreement["n"] = int(len(merged))
        drv.write_json(output_dir / "group_agreement.json", agreement)
        LOGGER.info("agreement with expert rim+ counts over %d units: r=%.3f, MSE=%.3f", len(merged),
                    agreement["count_pearson_r"], agreement["count_mse"])

    from ..reports.group import write_group_report

    reports = {}
    for _, row in table.iterrows():
        unit = drv.Unit(row["participant_id"][4:], None if row["session"] == "n/a" else row["session"])
        reports[unit.prefix] = drv.report_path(output_dir, unit).name
    write_group_report(output_dir / GROUP_REPORT, group_table=table, probabilities=lesion_probabilities(output_dir),
                       failed=failed, participant_reports=reports, agreement=agreement, versions=drv.versions())
    for participant, reason in failed:
        LOGGER.warning("%s: %s", participant, reason)
    LOGGER.info("group table: %s (%d units, %d rim+ lesions); report: %s", output_dir / GROUP_TABLE,
                len(table), int(table["n_rimplus"].sum()), output_dir / GROUP_REPORT)
    return 1 if failed else 0
