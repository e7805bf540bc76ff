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
# From each unit's transform sidecar: which target its FLAIR was registered to and the gate's verdict.
GATE_COLUMNS = ["registration_target", "registration_gate_mm", "registration_gate"]
COUNT_COLUMNS = ["n_lesions", "n_rimplus", "lesion_volume_mm3", "rimplus_volume_mm3", "n_rimplus_expected",
                 "n_rimplus_ci_low", "n_rimplus_ci_high"]
GATE_DICTIONARY = {
    "registration_target": {"Description": "What the FLAIR was registered to: the magnitude, the QSM-derived "
                                           "stand-in (no magnitude), or none (--registration header)"},
    "registration_gate_mm": {"Description": "Registration gate value: mean distance over the brain between the "
                                            "registration and a fit of the brain outlines started from it",
                             "Units": "mm"},
    "registration_gate": {"Description": "Registration gate verdict",
                          "Levels": {"pass": "at or below the threshold",
                                     "fail": "above the threshold: counts left out (n/a) unless the group level "
                                             "ran with --keep-failed-registration",
                                     "fail-kept": "above the threshold, counts kept by --keep-failed-registration",
                                     "n/a": "not measured (no brain outline in the QSM grid, see the transform's "
                                            "sidecar) or not recorded (outputs of a version without the gate)"}},
}
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
    # the session label comes from the unit, not the TSV: read back, "01" would become the number 1
    rows = [drv.read_tsv(path).assign(session=unit.session or "n/a")
            for unit, path in sorted(summaries.items(), key=lambda kv: (kv[0].subject, kv[0].session or ""))]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=GROUP_COLUMNS)
    table = table.reindex(columns=GROUP_COLUMNS)
    table["session"] = table["session"].fillna("n/a")
    table = table.drop_duplicates(subset=["participant_id", "session"], keep="last")
    table = table.sort_values(["participant_id", "session"]).reset_index(drop=True)
    table, gate_failed = _apply_registration_gate(config, table)
    done = {unit.subject for unit in summaries}
    logs = drv.latest_unit_logs(config.output_dir)
    failed = [(f"sub-{label}", _failure_reason(config, label, logs)) for label in expected_participants(config)
              if label not in done]
    failed += gate_failed
    # A unit that was complete before and failed on a later run keeps its earlier outputs (they are in
    # the table); its latest failure is listed too, so it is not mistaken for an up-to-date result.
    for unit in sorted(summaries, key=lambda u: (u.subject, u.session or "")):
        record = logs.get(unit.prefix)
        if record and record["status"] in ("failed", "skipped"):
            failed.append((unit.prefix, f"latest participant run {record['status']} ({_logged_reason(record)}; "
                                        f"log: {record['log_file']}); the outputs of its earlier complete run are kept"))
    return table, failed


def _logged_reason(record: dict) -> str:
    """The one-line reason a unit's ``logs/`` record gives (older records have only ``error``)."""
    return record.get("reason") or record.get("error") or "?"


def _apply_registration_gate(config: AppConfig, table: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Mark each unit's registration gate; a failed unit's counts become n/a unless --keep-failed-registration."""
    table = table.copy()
    for column in GATE_COLUMNS:
        table[column] = "n/a"
    table["registration_gate_mm"] = np.nan
    failed = []
    for index, row in table.iterrows():
        unit = drv.Unit(row["participant_id"][4:], None if row["session"] == "n/a" else row["session"])
        gate = drv.registration_gate(drv.sidecar_path(drv.output_path(config.output_dir, unit, "xfm_flair_to_qsm")))
        if gate is None:
            continue
        table.loc[index, ["registration_target", "registration_gate"]] = [gate["target"], gate["verdict"]]
        table.loc[index, "registration_gate_mm"] = gate["value_mm"]
        if gate["verdict"] != "fail":
            continue
        what = (f"registration gate failed ({gate['value_mm']:.2f} mm > {gate['threshold_mm']:.2f} mm: the FLAIR "
                "disagrees with the brain outlines; check its report's registration overlay)")
        if config.keep_failed_registration:
            table.loc[index, "registration_gate"] = "fail-kept"
            failed.append((unit.prefix, what + "; counts kept (--keep-failed-registration)"))
        else:
            table.loc[index, COUNT_COLUMNS] = np.nan
            failed.append((unit.prefix, what + "; counts left out of the group table (n/a) and analysis; "
                                               "--keep-failed-registration keeps them"))
    return table, failed


def _failure_reason(config: AppConfig, label: str, logs: dict[str, dict]) -> str:
    ended = {prefix: record for prefix, record in sorted(logs.items()) if record["status"] in ("failed", "skipped")
             and (prefix == f"sub-{label}" or prefix.startswith(f"sub-{label}_ses-"))}
    if ended:  # quoted from the units' own records: "failed" (a step, an unusable input) or "skipped"
        return "; ".join(f"participant level {record['status']}: {prefix}: {_logged_reason(record)} "
                         f"(log: {record['log_file']})" for prefix, record in ended.items())
    crash_dirs = sorted((Path(config.work_dir) / "crashes").glob(f"sub-{label}*")) if config.work_dir else []
    crashes = [c for d in crash_dirs for c in d.glob("crash-*")]
    if crashes:
        return f"participant level failed (crash report: {crashes[0]})"
    return "no participant-level outputs and no record in logs/: its participant level has not been run"


EXPERT_COLUMNS = ["participant_id", "session", "n_labelled", "n_rimplus_expert", "expert_rimplus_found",
                  "model_rimplus_expert_negative"]


def expert_counts(output_dir: Path) -> pd.DataFrame:
    """Per unit with rim annotations: the expert's rim+ count, and lesion by lesion against the model's calls,
    how many of the expert's rim+ lesions the model also calls rim+ and how many of its rim+ calls the expert
    marked rim- (NaN where the unit has no classified lesion table)."""
    rows = []
    model_tables = find_units(output_dir, "rim_lesions")
    for unit, path in sorted(find_units(output_dir, "annotations").items(), key=lambda kv: kv[1]):
        rater = drv.read_tsv(path)
        labels = pd.to_numeric(rater["rim_positive"], errors="coerce")
        row = {"participant_id": unit.participant_id, "session": unit.session or "n/a",
               "n_labelled": int(labels.notna().sum()), "n_rimplus_expert": int(np.nansum(labels.to_numpy(float))),
               "expert_rimplus_found": np.nan, "model_rimplus_expert_negative": np.nan}
        if unit in model_tables:
            model = drv.read_tsv(model_tables[unit])[["lesion_id", "rim_positive"]]
            both = model.merge(pd.DataFrame({"lesion_id": rater["lesion_id"], "expert": labels}), on="lesion_id")
            called = pd.to_numeric(both["rim_positive"], errors="coerce") == 1
            row["expert_rimplus_found"] = int((called & (both["expert"] == 1)).sum())
            row["model_rimplus_expert_negative"] = int((called & (both["expert"] == 0)).sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=EXPERT_COLUMNS)


def expert_agreement(merged: pd.DataFrame) -> dict:
    """Counts agreement (model.metrics.expert_count_agreement) plus the lesion-level tally over all units."""
    from ..model.metrics import expert_count_agreement

    agreement = expert_count_agreement(merged["n_rimplus"].to_numpy(float),
                                       merged["n_rimplus_expert"].to_numpy(float))
    scored = merged.dropna(subset=["expert_rimplus_found"])
    agreement["lesions"] = {"expert_rimplus": int(scored["n_rimplus_expert"].sum()),
                            "expert_rimplus_found": int(scored["expert_rimplus_found"].sum()),
                            "model_rimplus_expert_negative": int(scored["model_rimplus_expert_negative"].sum())}
    return agreement


def agreement_line(agreement: dict) -> str:
    """The log's one line: numbers where they are defined, the reason where they are not (never 'nan')."""
    n = agreement["n"]
    if n == 0:
        return "agreement with expert rim+ counts not computed: no unit with expert counts has model counts"
    if agreement["count_pearson_r"] is None:
        reason = agreement["r_not_computed"].rstrip(".")
        r_text = f"r not computed: {reason[0].lower()}{reason[1:]};"
    elif agreement["count_pearson_ci"] is None:
        r_text = f"r={agreement['count_pearson_r']:.3f} (no 95% CI: fewer than 4 units),"
    else:
        lo, hi = agreement["count_pearson_ci"]
        r_text = f"r={agreement['count_pearson_r']:.3f} [95% CI {lo:.3f}, {hi:.3f}],"
    les = agreement["lesions"]
    return (f"agreement with expert rim+ counts over {n} unit(s): {r_text} MSE={agreement['count_mse']:.3f}, "
            f"mean model-expert difference {agreement['mean_difference']:+.2f}, {agreement['exact_matches']} of {n} "
            f"exact; lesions: the model calls {les['expert_rimplus_found']} of the experts' {les['expert_rimplus']} "
            f"rim+ lesions rim+, and {les['model_rimplus_expert_negative']} of their rim- lesions rim+")


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
    """The group level, with its own ``logs/`` record closed when it ends (done, or failed with the code)."""
    output_dir = Path(config.output_dir)
    drv.init_output_dir(output_dir, config.bids_dir, config.container)
    log = drv.write_run_log(output_dir, "group", config.command_line, {"train": config.train}, label="group")
    try:
        code = _run_group(config, output_dir)
    except BaseException as exc:
        drv.finish_run_log(log, "failed", f"{type(exc).__name__}: {exc}")
        raise
    drv.finish_run_log(log, "done" if code == 0 else "failed",
                       None if code == 0 else f"the group level exited {code} (see its log lines and report)",
                       extra={"exit_code": code})
    return code


def _run_group(config: AppConfig, output_dir: Path) -> int:
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
                   {**{k: v for k, v in drv.SUMMARY_DICTIONARY.items() if k in GROUP_COLUMNS}, **GATE_DICTIONARY})

    given = expert_counts(output_dir)
    experts = table.merge(given, on=["participant_id", "session"], how="inner")
    agreement = None
    if len(given):  # even when none of them has model counts: the report then says so, not "none given"
        # units whose counts the registration gate left out (n/a) are not compared
        agreement = expert_agreement(experts.dropna(subset=["n_rimplus"]))
        drv.write_json(output_dir / "group_agreement.json", agreement)
        LOGGER.info("%s", agreement_line(agreement))

    from ..reports.group import write_group_report
    from .longitudinal import longitudinal_section, run_longitudinal

    extra = [longitudinal_section(output_dir, run_longitudinal(config))]

    reports = {}
    for _, row in table.iterrows():
        unit = drv.Unit(row["participant_id"][4:], None if row["session"] == "n/a" else row["session"])
        reports[unit.prefix] = drv.report_path(output_dir, unit).name
    write_group_report(output_dir / GROUP_REPORT, group_table=table, probabilities=lesion_probabilities(output_dir),
                       failed=failed, participant_reports=reports, agreement=agreement, versions=drv.versions(),
                       experts=experts, extra_sections=extra)
    for participant, reason in failed:
        LOGGER.warning("%s: %s", participant, reason)
    LOGGER.info("group table: %s (%d units, %d rim+ lesions); report: %s", output_dir / GROUP_TABLE,
                len(table), int(np.nansum(table["n_rimplus"].to_numpy(float))), output_dir / GROUP_REPORT)
    return 1 if failed else 0
