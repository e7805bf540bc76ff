"""nipype's MultiProc scheduler, adapted to running many participant units in one graph.

Three changes, each for a failure seen in practice:

- **Unit order.** Ready nodes are offered unit by unit (the first unit's nodes first), so units
  finish (and are published) one after another instead of all at the very end; the second core
  still picks up the next unit's nodes while the first unit's single-threaded registration runs.
- **A dying worker.** When a worker process dies (SIGKILL from the kernel's OOM killer, a crash in
  a C library), ``concurrent.futures`` breaks the whole pool and fails every task that was running;
  nipype's MultiProc then waits forever for results that never come. Here the pool is rebuilt,
  the tasks that were running are retried one at a time on their own, and a task whose worker dies
  again alone fails with :class:`WorkerDiedError` naming the node and the likely cause (memory).
  The other units are not affected.
- **Measured memory.** Each node's peak resident memory (worker process and its children) is
  recorded (``memory_log``), so node memory estimates can be checked against what nodes used.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import resource
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as ssp
from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

LOGGER = logging.getLogger("qsmrim")


class WorkerDiedError(RuntimeError):
    """A node's worker process died (not a Python exception): almost always the memory limit."""


def dependency_matrix(graph: nx.DiGraph, nodelist: list) -> ssp.lil_matrix:
    """The graph's adjacency in ``nodelist`` order as the sparse LIL matrix nipype's scheduler edits in
    place (``depidx``: row i, column j set when node j waits for node i). Our own three lines instead of
    nipype's private helper, so a nipype release that moves it cannot break the scheduler."""
    return ssp.lil_matrix(nx.to_scipy_sparse_array(graph, nodelist=nodelist, format="lil"))


def worker_died_message(node_name: str) -> str:
    return (f"the worker process running node {node_name} died twice, the second time running alone "
            "(killed by the operating system, most likely because it ran out of memory); free memory, "
            "lower --nprocs, or set --mem-gb to the memory this job may use")


def _peak_rss_gb() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), in GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_node_measured(node, updatehash: bool, taskid: int) -> dict:
    """nipype's ``run_node`` plus the node's peak memory (its process, or its largest child process)."""
    _reset_peak_rss()
    result = run_node(node, updatehash, taskid)
    children_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    result["peak_rss_gb"] = max(_peak_rss_gb(), children_gb)
    return result


def unit_of(node) -> str:
    """The unit workflow a flattened node belongs to (``participants_wf.sub_01_wf`` -> ``sub_01_wf``)."""
    hierarchy = (node._hierarchy or "").split(".")
    return hierarchy[1] if len(hierarchy) > 1 else hierarchy[0]


class UnitMultiProcPlugin(MultiProcPlugin):
    """MultiProc with unit ordering, recovery from dead workers and per-node peak memory."""

    def __init__(self, plugin_args: dict | None = None) -> None:
        args = dict(plugin_args or {})
        self._unit_rank: dict[str, int] = {name: i for i, name in enumerate(args.pop("unit_order", []))}
        super().__init__(plugin_args=args)
        self._lost: set[int] = set()
        self._retry: deque[int] = deque()
        self._isolating: int | None = None
        self._task_nodes: dict[int, tuple] = {}
        self.memory_log: list[tuple[str, float]] = []
        self.workers_died = 0

    # -- order -------------------------------------------------------------------------------------
    def _generate_dependency_list(self, graph) -> None:
        order = list(nx.topological_sort(graph))
        rank = {node: (self._unit_rank.get(unit_of(node), len(self._unit_rank)), i) for i, node in enumerate(order)}
        # Units are disconnected subgraphs, so a stable sort by unit keeps the order topological.
        self.procs = sorted(order, key=rank.__getitem__)
        self.depidx = dependency_matrix(graph, self.procs)
        self.refidx = self.depidx.astype(int)
        self.proc_done = np.zeros(len(self.procs), dtype=bool)
        self.proc_pending = np.zeros(len(self.procs), dtype=bool)

    # -- submitting and collecting ---------------------------------------------------------------
    def _new_pool(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = ProcessPoolExecutor(max_workers=self.processors, initializer=process_initializer,
                                        initargs=(self._cwd,),
                                        mp_context=mp.get_context(self.plugin_args.get("mp_context")))

    def _submit_to_pool(self, taskid: int) -> None:
        node, updatehash = self._task_nodes[taskid]
        try:
            future = self.pool.submit(run_node_measured, node, updatehash, taskid)
        except BrokenProcessPool:
            self._new_pool()
            future = self.pool.submit(run_node_measured, node, updatehash, taskid)
        future.add_done_callback(partial(self._task_done, taskid))
        self._task_obj[taskid] = future

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        self._task_nodes[self._taskid] = (node, updatehash)
        self._submit_to_pool(self._taskid)
        return self._taskid

    def _task_done(self, taskid: int, future) -> None:
        try:
            self._taskresult[taskid] = future.result()
        except BrokenProcessPool:  # this task's worker, or another one, died: retry it
            self._lost.add(taskid)
        except Exception as exc:  # pickling errors and the like: a normal node failure
            self._taskresult[taskid] = {"result": None, "taskid": taskid,
                                        "traceback": [f"{type(exc).__name__}: {exc}\n"]}

    def _get_result(self, taskid: int):
        if taskid in self._taskresult:
            if taskid == self._isolating:
                self._isolating = None
            result = self._taskresult[taskid]
            node = self._task_nodes[taskid][0]
            if "peak_rss_gb" in result:
                self.memory_log.append((node.fullname, float(result["peak_rss_gb"])))
            return result
        if taskid in self._lost:
            self._lost.discard(taskid)
            node = self._task_nodes[taskid][0]
            if taskid == self._isolating:  # died again, alone: this node is the cause
                self._isolating = None
                self.workers_died += 1
                message = worker_died_message(node.name)
                LOGGER.error("%s", message)
                return {"result": None, "taskid": taskid, "traceback": [f"WorkerDiedError: {message}\n"]}
            LOGGER.warning("a worker process died while node %s was running; retrying it on its own", node.fullname)
            self._retry.append(taskid)
        self._resubmit_one()
        return None

    def _resubmit_one(self) -> None:
        """Resubmit the next lost task once nothing else runs (so a second death names the culprit)."""
        if self._isolating is not None or not self._retry:
            return
        if any(not f.done() for f in self._task_obj.values()):
            return
        self._new_pool()
        taskid = self._retry.popleft()
        self._isolating = taskid
        self._submit_to_pool(taskid)

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        self._task_nodes.pop(taskid, None)
        self._taskresult.pop(taskid, None)

    def _send_procs_to_workers(self, updatehash=False, graph=None):
        if self._retry or self._isolating is not None or self._lost:
            self._resubmit_one()
            return  # nothing new starts while lost tasks are being retried
        super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
