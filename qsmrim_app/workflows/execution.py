"""Running nipype workflows the way the app needs: resumable, one clear error line per unit.

``run_units`` runs every participant unit in one graph (MultiProc: processes and memory bounded by
--nprocs / --mem-gb, units isolated from each other's failures); ``run_workflow`` runs one unit
with any plugin (SLURM and the like submit per unit).
"""
from __future__ import annotations

import gc
import logging
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nipype import Workflow

from ..config import AppConfig

LOGGER = logging.getLogger("qsmrim")


class WorkflowError(RuntimeError):
    """A unit's workflow failed; the message is the root cause, not nipype's generic line."""


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Exclude everything alive now (imported modules, torch, the loaded model) from garbage collection.

    nipype's schedulers call ``gc.collect()`` before every submission and after every node they run
    themselves; with torch, pandas and pybids imported each full collection took ~0.27 s, ~7 CPU s of a
    ~35 CPU s participant run (28 collections per unit). Frozen objects are skipped, so each collection
    only walks what the run itself allocates; after the run they are collected normally again.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_workflow(wf: Workflow, config: AppConfig, label: str) -> None:
    """Run one unit's workflow with the configured plugin (the path for schedulers such as SLURM)."""
    crash_dir = crash_dir_for(config, label)
    if crash_dir.exists():
        shutil.rmtree(crash_dir)  # crashes of an earlier attempt must not be reported again
    wf.config["execution"].update(_execution_settings(crash_dir, True))
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
        with frozen_heap():
            wf.run(plugin=plugin, plugin_args=plugin_args)
        if plugin == "SLURMGraph":
            _wait_for_slurm_jobs(wf, config)
    except Exception as exc:
        raise WorkflowError(_root_cause(crash_dir) or str(exc)) from exc
    cause = _root_cause(crash_dir)
    if cause:  # plugins that submit and return (SLURMGraph) report failures only as crash files
        raise WorkflowError(cause)


#: What a dying process or an exhausted memory most likely means, added to the node's error.
_MEMORY_HINT = ("most likely out of memory: free memory, lower --nprocs, or set --mem-gb to the memory "
                "this job may use")


def _root_cause(crash_dir: Path) -> str | None:
    """The last exception line of the first crash file: e.g. ``InputDataError: FLAIR ...: ...``.

    A MemoryError or a helper process pool that broke (a worker killed by the kernel) is named as
    such, with the likely cause, instead of an empty message.
    """
    crashes = sorted(crash_dir.glob("crash-*")) if crash_dir.exists() else []
    for crash in crashes:
        lines = [line.strip() for line in crash.read_text(errors="replace").splitlines() if line.strip()]
        node = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Node:")), "?")
        node = node.rsplit(".", 1)[-1]
        for line in reversed(lines):
            head, _, message = line.partition(":")
            kind = head.rsplit(".", 1)[-1]
            if kind == "MemoryError" or line == "MemoryError":
                return f"node {node} ran out of memory ({message.strip() or 'MemoryError'}); {_MEMORY_HINT} (details: {crash})"
            if kind == "BrokenProcessPool":
                return (f"a helper process of node {node} died abruptly; {_MEMORY_HINT} (details: {crash})")
            if kind.endswith(("Error", "Exception")) and not line.startswith("RuntimeError: Traceback"):
                return f"{message.strip()} (node {node}; details: {crash})"
        return f"node {node} crashed; details: {crash}"
    return None


_DETAILS_RE = re.compile(r"details: (?P<file>\S+?)\)?$")


def crash_file_of(cause: str | None) -> str | None:
    """The crash file a root cause (``_root_cause``) names, for the unit's ``logs/`` record."""
    match = _DETAILS_RE.search(cause or "")
    return match["file"] if match else None


def crash_dir_for(config: AppConfig, label: str) -> Path:
    """Each unit's crash files go to a folder of its own, so failures are told apart per unit."""
    return Path(config.work_dir) / "crashes" / label


def _execution_settings(crash_dir: Path, stop_on_first_crash: bool) -> dict:
    return {
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": stop_on_first_crash,
        "remove_unnecessary_outputs": False,  # keep every node's outputs: resuming needs them
        "hash_method": "content",  # inputs that were re-exported unchanged do not rerun
        "poll_sleep_duration": 0.5,
    }


class UnitProgress:
    """nipype status callback: counts units done / running / failed and logs each change.

    A unit is done when its ``publish`` node finished, failed as soon as any of its nodes raised.
    ``on_done`` is called (in the main process) for each unit the moment it is published.
    """

    def __init__(self, names: dict[str, str], on_done=None, publish_node: str = "publish") -> None:
        self.names = names  # workflow name -> unit label (sub-01_ses-1)
        self.state: dict[str, str] = {}
        self.failed_nodes: dict[str, str] = {}
        self._on_done = on_done
        self._publish = publish_node
        self._last: tuple | None = None

    def __call__(self, node, status: str) -> None:
        from .multiproc import unit_of

        label = self.names.get(unit_of(node))
        if label is None or self.state.get(label) in ("done", "failed"):
            return
        if status == "exception":
            self.state[label] = "failed"
            self.failed_nodes[label] = node.name
            LOGGER.error("%s: node %s failed (the unit's other nodes are skipped; cause below)", label, node.name)
        elif status == "start":
            self.state[label] = "running"
        elif status == "end" and node.name == self._publish and self.failed_nodes.get(label) is None:
            self.state[label] = "done"
            if self._on_done is not None:
                self._on_done(label)
        self.show()

    def counts(self) -> tuple[int, int, int, int]:
        values = list(self.state.values())
        done, running, failed = (values.count(k) for k in ("done", "running", "failed"))
        return done, running, failed, len(self.names) - done - running - failed

    def show(self) -> None:
        counts = self.counts()
        if counts != self._last:
            self._last = counts
            LOGGER.info("units: %d done, %d running, %d failed, %d waiting (of %d)", *counts, len(self.names))


def run_units(config: AppConfig, workflows: dict[str, Workflow], on_done=None) -> dict[str, str | None]:
    """Run every unit's workflow in one nipype graph under one process/memory budget.

    ``workflows``: unit label -> its workflow. Returns unit label -> None (published) or the root
    cause of its failure. One unit's failure never stops the others (``stop_on_first_crash`` off).
    """
    from .multiproc import UnitMultiProcPlugin

    top = Workflow(name="participants_wf", base_dir=str(config.work_dir))
    for label, wf in workflows.items():
        crash_dir = crash_dir_for(config, label)
        if crash_dir.exists():
            shutil.rmtree(crash_dir)  # crashes of an earlier attempt must not be reported again
        for name in wf.list_node_names():  # node settings win over the top workflow's when flattened
            wf.get_node(name).config = {"execution": {"crashdump_dir": str(crash_dir)}}
    top.add_nodes(list(workflows.values()))
    top.config["execution"].update(_execution_settings(Path(config.work_dir) / "crashes", False))
    progress = UnitProgress({wf.name: label for label, wf in workflows.items()}, on_done=on_done)
    plugin_args = dict(config.plugin_args)
    plugin_args.setdefault("n_procs", config.nprocs)
    if config.mem_gb:
        plugin_args.setdefault("memory_gb", config.mem_gb)
    plugin_args.setdefault("raise_insufficient", False)
    plugin_args["status_callback"] = progress
    plugin_args["unit_order"] = [wf.name for wf in workflows.values()]
    runner = UnitMultiProcPlugin(plugin_args=plugin_args)
    progress.show()
    try:
        with frozen_heap():
            top.run(plugin=runner)
    except Exception as exc:  # some node failed; which units, and why, is read from the crash files
        LOGGER.debug("the participants' graph ended with failures: %s", exc)
    _write_memory_log(Path(config.work_dir) / "node_memory.tsv", runner.memory_log)
    outcome: dict[str, str | None] = {}
    for label in workflows:
        cause = _root_cause(crash_dir_for(config, label))
        if progress.state.get(label) == "done" and cause is None:
            outcome[label] = None
        else:
            outcome[label] = cause or (f"node {progress.failed_nodes[label]} failed" if label in progress.failed_nodes
                                       else "the unit did not finish (its nodes were not run)")
    return outcome


def _write_memory_log(path: Path, rows: list[tuple[str, float]]) -> None:
    """Measured peak memory per node of this run (appended), for checking the nodes' estimates."""
    if not rows:
        return
    new = not path.is_file()
    with path.open("a") as handle:
        if new:
            handle.write("node\tpeak_rss_gb\n")
        handle.writelines(f"{name}\t{gb:.4f}\n" for name, gb in rows)


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
