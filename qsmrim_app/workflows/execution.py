"""Running a nipype workflow the way the app needs: chosen plugin, resumable, one clear error line."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

from nipype import Workflow

from ..config import AppConfig

LOGGER = logging.getLogger("qsmrim")


class WorkflowError(RuntimeError):
    """A unit's workflow failed; the message is the root cause, not nipype's generic line."""


def run_workflow(wf: Workflow, config: AppConfig, label: str) -> None:
    crash_dir = Path(config.work_dir) / "crashes" / label
    if crash_dir.exists():
        shutil.rmtree(crash_dir)  # crashes of an earlier attempt must not be reported again
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": True,
        "remove_unnecessary_outputs": False,  # keep every node's outputs: resuming needs them
        "hash_method": "content",  # inputs that were re-exported unchanged do not rerun
        "poll_sleep_duration": 0.5,
    })
    plugin = config.plugin
    plugin_args = dict(config.plugin_args)
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", config.nprocs)
        if config.mem_gb:
            plugin_args.setdefault("memory_gb", config.mem_gb)
        plugin_args.setdefault("raise_insufficient", False)
    if plugin in ("SLURM", "SLURMGraph"):
        plugin_args.setdefault("sbatch_args", f"--cpus-per-task={config.nprocs}")
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
        if plugin == "SLURMGraph":
            _wait_for_slurm_jobs(wf, config)
    except Exception as exc:
        raise WorkflowError(_root_cause(crash_dir) or str(exc)) from exc
    cause = _root_cause(crash_dir)
    if cause:  # plugins that submit and return (SLURMGraph) report failures only as crash files
        raise WorkflowError(cause)


def _root_cause(crash_dir: Path) -> str | None:
    """The last exception line of the first crash file: e.g. ``InputDataError: FLAIR ...: ...``."""
    crashes = sorted(crash_dir.glob("crash-*")) if crash_dir.exists() else []
    for crash in crashes:
        lines = [line.strip() for line in crash.read_text(errors="replace").splitlines() if line.strip()]
        node = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Node:")), "?")
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) and not head.startswith("RuntimeError: Traceback"):
                return f"{line.split(':', 1)[1].strip()} (node {node}; details: {crash})"
        return f"node {node} crashed; details: {crash}"
    return None


def _wait_for_slurm_jobs(wf: Workflow, config: AppConfig, poll_s: float = 2.0) -> None:
    """SLURMGraph submits the whole graph and returns: wait until none of its jobs is queued or running.

    Its jobs are named in ``batch/submit_jobs.sh`` (``<name>=$(sbatch ...)``), so we poll squeue for those.
    """
    submit = Path(wf.base_dir) / wf.name / "batch" / "submit_jobs.sh"
    if not submit.is_file():
        raise WorkflowError(f"SLURMGraph wrote no {submit}; nothing was submitted")
    job_names = set(re.findall(r"^(\w+)=\$\(sbatch ", submit.read_text(), re.M))
    while job_names:
        out = subprocess.run(["squeue", "--noheader", "--format=%j", "--me"], capture_output=True, text=True)
        if out.returncode != 0:
            raise WorkflowError(f"squeue failed while waiting for SLURMGraph jobs: {out.stderr.strip()}")
        if not job_names & set(out.stdout.split()):
            return
        time.sleep(poll_s)


def scheduler_errors(wf: Workflow, limit: int = 3) -> str:
    """The non-empty stderr files of a scheduler's batch jobs (a job killed for memory leaves no crash file)."""
    batch = Path(wf.base_dir) / wf.name / "batch"
    found = [p for p in sorted(batch.glob("*.e*")) if p.is_file() and p.stat().st_size] if batch.exists() else []
    return "; ".join(f"{p.name}: {p.read_text(errors='replace').strip().splitlines()[-1]}" for p in found[:limit])
