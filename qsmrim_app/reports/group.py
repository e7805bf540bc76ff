"""The group report: one self-contained HTML page over all participants of a run.

Built from the group table and the per-lesion probabilities the group level already gathered; failed
participants are listed with their reason rather than silently missing from the counts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..derivatives import write_text
from ._html import esc, figure_data_uri, fixed, fmt, img_tag, kv_table, new_figure, page, safe_href, table

# group-table column -> (header, decimals; None for text)
PARTICIPANT_COLUMNS: dict[str, tuple[str, int | None]] = {
    "session": ("session", None),
    "n_lesions": ("lesions", 0),
    "n_rimplus": ("rim+", 0),
    "n_rimplus_expected": ("expected rim+", 1),  # sum of calibrated probabilities (model/counts.py)
    "n_rimplus_ci_low": ("95% low", 0),
    "n_rimplus_ci_high": ("95% high", 0),
    "lesion_volume_mm3": ("lesion volume (mm³)", 1),
    "rimplus_volume_mm3": ("rim+ volume (mm³)", 1),
    "model_id": ("model", None),
    "threshold": ("threshold", 3),
    "registration_gate": ("registration gate", None),
    "registration_gate_mm": ("gate (mm)", 2),
}
AGREEMENT_LABELS = {
    "n": "Participants/sessions with expert counts",
    "count_mse": "Mean squared error of counts",
    "mean_difference": "Mean difference (model \u2212 expert)",
}


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip() in ("", "n/a", "nan", "None")


def report_key(participant_id: str, session: Any = None) -> str:
    """The key of `participant_reports`: `participant_id`, plus `_<session>` when there is a session."""
    return str(participant_id) if _missing(session) else f"{participant_id}_{session}"


def _find_href(participant_reports: Mapping[str, str], participant_id: str, session: Any) -> str | None:
    """Look a report up tolerantly (with/without `sub-`/`ses-` prefixes), since labels come from several places."""
    pid = str(participant_id)
    pids = {pid, pid.removeprefix("sub-"), "sub-" + pid.removeprefix("sub-")}
    if _missing(session):
        candidates = pids
    else:
        ses = str(session)
        sess = {ses, ses.removeprefix("ses-"), "ses-" + ses.removeprefix("ses-")}
        candidates = {f"{p}_{s}" for p in pids for s in sess}
    for key in candidates:
        if key in participant_reports:
            return safe_href(participant_reports[key])
    return None


def _histograms(group_table: pd.DataFrame, probabilities: pd.DataFrame) -> str | None:
    """Rim+ count per participant and rim+ probability over all lesions, side by side."""
    counts = pd.to_numeric(group_table.get("n_rimplus", pd.Series(dtype=float)), errors="coerce").dropna()
    probs = pd.to_numeric(probabilities.get("probability", pd.Series(dtype=float)), errors="coerce").dropna()
    if counts.empty and probs.empty:
        return None
    fig = new_figure(10.0, 3.4)
    ax_count, ax_prob = fig.subplots(1, 2)
    if counts.empty:
        ax_count.text(0.5, 0.5, "no participants", ha="center", va="center", transform=ax_count.transAxes)
    else:
        top = int(counts.max())
        ax_count.hist(counts.to_numpy(), bins=np.arange(-0.5, top + 1.5, 1.0), color="#c01c28", edgecolor="white")
        ax_count.set_xticks(range(0, top + 1, max(1, math.ceil((top + 1) / 12))))
    ax_count.set_xlabel("rim+ lesions per participant")
    ax_count.set_ylabel("participants")
    ax_count.set_title(f"Rim+ count distribution (n = {len(counts)})", fontsize=10)
    if probs.empty:
        ax_prob.text(0.5, 0.5, "no lesions", ha="center", va="center", transform=ax_prob.transAxes)
    else:
        ax_prob.hist(probs.clip(0, 1).to_numpy(), bins=np.linspace(0, 1, 21), color="#1a5fb4", edgecolor="white")
    thresholds = pd.to_numeric(group_table.get("threshold", pd.Series(dtype=float)), errors="coerce").dropna()
    for thr in sorted(set(thresholds.round(4))):
        ax_prob.axvline(thr, color="k", linestyle="--", linewidth=1)
        ax_prob.text(thr, 0.97, f" threshold {thr:g}", transform=ax_prob.get_xaxis_transform(), fontsize=8,
                     va="top")
    ax_prob.set_xlim(0, 1)
    ax_prob.set_xlabel("rim+ probability")
    ax_prob.set_ylabel("lesions")
    ax_prob.set_title(f"Rim+ probability over all lesions (n = {len(probs)})", fontsize=10)
    fig.tight_layout()
    return figure_data_uri(fig, dpi=80)


def _participants_table(group_table: pd.DataFrame, participant_reports: Mapping[str, str]) -> str:
    if group_table.empty:
        return "<p>No participant finished successfully.</p>"
    df = group_table.sort_values([c for c in ("participant_id", "session") if c in group_table.columns],
                                 kind="mergesort")
    cols = [c for c in PARTICIPANT_COLUMNS if c in df.columns]
    rows = []
    for _, row in df.iterrows():
        pid = row["participant_id"]
        href = _find_href(participant_reports, pid, row.get("session"))
        link = f'<a href="{esc(href)}">report</a>' if href else "no report"
        cells = [esc(fixed(row[c], PARTICIPANT_COLUMNS[c][1]) if PARTICIPANT_COLUMNS[c][1] is not None
                     else fmt(row[c])) for c in cols]
        rows.append([esc(pid)] + cells + [link])
    return table(["participant"] + [PARTICIPANT_COLUMNS[c][0] for c in cols] + ["report"], rows,
                 numeric=[False] + [PARTICIPANT_COLUMNS[c][1] is not None for c in cols] + [False])


def _failed_section(failed: Sequence[tuple[str, str]], participant_reports: Mapping[str, str]) -> str:
    if not failed:
        return '<section id="failed"><h2>Failed participants</h2><p>None: every participant finished.</p></section>'
    rows = []
    for participant, reason in failed:
        href = _find_href(participant_reports, participant, None)
        link = f'<a href="{esc(href)}">report</a>' if href else "no report"
        rows.append([esc(participant), esc(reason), link])
    return (
        f'<section id="failed"><h2>Failed participants ({len(failed)})</h2><p class="caption">These participants '
        "are not in the counts and distributions above.</p>"
        + table(["participant", "reason", "report"], rows) + "</section>"
    )


def _pearson_text(agreement: Mapping[str, Any]) -> tuple[str, str]:
    """(r, its 95% interval) as text, or the sentence why each is not computed: never a bare n/a."""
    r = agreement.get("count_pearson_r")
    if r is None or _missing(r):
        return agreement.get("r_not_computed") or "not computed", agreement.get("ci_not_computed") or "not computed"
    ci = agreement.get("count_pearson_ci")
    if ci is None or any(_missing(v) for v in ci):
        return fmt(float(r)), agreement.get("ci_not_computed") or "not computed"
    return fmt(float(r)), f"[{fmt(float(ci[0]))}, {fmt(float(ci[1]))}]"


def _expert_table(experts: pd.DataFrame, participant_reports: Mapping[str, str]) -> str:
    """Model vs expert rim+ counts per participant/session, with the lesion-level tally."""
    rows = []
    for _, row in experts.iterrows():
        href = _find_href(participant_reports, row["participant_id"], row.get("session"))
        link = f'<a href="{esc(href)}#annotations">report</a>' if href else "no report"
        model, expert = row.get("n_rimplus"), row.get("n_rimplus_expert")
        diff = float(model) - float(expert) if not (_missing(model) or _missing(expert)) else float("nan")
        rows.append([esc(row["participant_id"]), esc(fmt(row.get("session"))), esc(fixed(model, 0)),
                     esc(fixed(expert, 0)), esc(f"{diff:+.0f}" if math.isfinite(diff) else "n/a"),
                     esc(fixed(row.get("expert_rimplus_found"), 0)),
                     esc(fixed(row.get("model_rimplus_expert_negative"), 0)), link])
    return table(["participant", "session", "model rim+", "expert rim+", "difference",
                  "expert rim+ the model calls rim+", "model rim+ the expert marked rim\u2212", "report"], rows,
                 numeric=[False, False, True, True, True, True, True, False])


def _agreement_section(agreement: Mapping[str, Any] | None, experts: pd.DataFrame | None = None,
                       participant_reports: Mapping[str, str] | None = None) -> str:
    head = '<section id="agreement"><h2>Agreement with expert counts</h2>'
    if not agreement:
        return head + "<p>No expert rim+ counts were given, so agreement was not computed.</p></section>"
    r_text, ci_text = _pearson_text(agreement)
    known = [("Pearson r (rim+ counts)", r_text), ("95% confidence interval of r", ci_text)]
    known += [(AGREEMENT_LABELS[k], agreement[k]) for k in AGREEMENT_LABELS if k in agreement]
    if "exact_matches" in agreement and "n" in agreement:
        known.append(("Participants/sessions with equal counts", f"{agreement['exact_matches']} of {agreement['n']}"))
    lesions = agreement.get("lesions") or {}
    if lesions:
        known.append(("Expert rim+ lesions the model calls rim+",
                      f"{lesions.get('expert_rimplus_found')} of {lesions.get('expert_rimplus')}"))
        known.append(("Expert rim\u2212 lesions the model calls rim+", lesions.get("model_rimplus_expert_negative")))
    caption = ('<p class="caption">Expert counts come from the rim annotations given to the participant level '
               "(each lesion's majority label). Each participant report lists the disagreements lesion by "
               "lesion.</p>")
    units = (_expert_table(experts, participant_reports or {}) if experts is not None and len(experts) else "")
    return head + caption + units + kv_table(known) + "</section>"


def _expected_rows(group_table: pd.DataFrame) -> list[tuple[str, Any]]:
    """Expected rim+ count over all units and how the probabilities were calibrated (model/counts.py)."""
    expected = pd.to_numeric(group_table.get("n_rimplus_expected", pd.Series(dtype=float)), errors="coerce")
    if expected.dropna().empty:
        return []
    maps = sorted({str(c) for c in group_table.get("calibration", pd.Series(dtype=str)).dropna()})
    return [("Expected rim+ lesions (sum of the rim+ probabilities, calibrated when the model has a map)", f"{expected.sum():.1f}"),
            ("Calibration of the probabilities", "; ".join(maps) if maps else "n/a")]


def write_group_report(
    out_file: Path,
    *,
    group_table: pd.DataFrame,
    probabilities: pd.DataFrame,
    failed: Sequence[tuple[str, str]],
    participant_reports: Mapping[str, str],
    agreement: Mapping[str, Any] | None,
    versions: Mapping[str, str],
    experts: pd.DataFrame | None = None,
    extra_sections: Sequence[tuple[str, str, str]] = (),
) -> Path:
    """Write the group HTML page to `out_file` and return its path.

    `participant_reports` maps `report_key(participant_id, session)` to a link relative to `out_file`.
    `experts` (the group table joined with workflows.group.expert_counts) gives the per-participant
    model vs expert table of the agreement section. `extra_sections` are (id, navigation title, HTML
    section) added before the versions (e.g. lesion tracks).
    """
    n_ok, n_failed = len(group_table), len(failed)
    n_lesions = pd.to_numeric(group_table.get("n_lesions", pd.Series(dtype=float)), errors="coerce").sum()
    n_rim = pd.to_numeric(group_table.get("n_rimplus", pd.Series(dtype=float)), errors="coerce").sum()
    with_rim = int((pd.to_numeric(group_table.get("n_rimplus", pd.Series(dtype=float)), errors="coerce") > 0).sum())
    models = sorted({str(m) for m in group_table.get("model_id", pd.Series(dtype=str)).dropna()})
    overview = [
        ("Participants / sessions processed", n_ok),
        ("Participants failed", n_failed),
        ("Lesions (all participants)", int(n_lesions)),
        ("Rim+ lesions (all participants)", int(n_rim)),
        ("Participants with at least one rim+ lesion", with_rim),
        ("Model(s)", ", ".join(models) if models else "n/a"),
        *_expected_rows(group_table),
    ]
    body = '<section id="overview"><h2>Overview</h2>' + kv_table(overview)
    if n_failed:
        body += f'<p class="bad">{n_failed} participant(s) failed; see <a href="#failed">Failed participants</a>.</p>'
    body += "</section>"
    uri = _histograms(group_table, probabilities)
    body += '<section id="distributions"><h2>Distributions</h2>'
    body += (img_tag(uri, "histograms of rim+ counts per participant and of rim+ probabilities")
             + '<p class="caption">Left: number of rim+ lesions per participant/session. Right: rim+ probability '
             "of every lesion; dashed line: the classification threshold.</p>") if uri else "<p>No data.</p>"
    body += "</section>"
    body += ('<section id="participants"><h2>Participants</h2>'
             + _participants_table(group_table, participant_reports) + "</section>")
    body += _failed_section(failed, participant_reports)
    body += _agreement_section(agreement, experts, participant_reports)
    body += "".join(html for _, _, html in extra_sections)
    body += ('<section id="versions"><h2>Software versions</h2>' + kv_table(versions, "No versions were recorded.")
             + "</section>")
    nav = [("overview", "Overview"), ("distributions", "Distributions"), ("participants", "Participants"),
           ("failed", "Failed"), ("agreement", "Agreement")]
    nav += [(sid, title) for sid, title, _ in extra_sections] + [("versions", "Versions")]
    return write_text(Path(out_file), page("qsmrim: group report", nav, body))
