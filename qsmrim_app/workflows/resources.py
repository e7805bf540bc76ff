"""Memory estimates of the participant nodes, so MultiProc schedules within --mem-gb.

nipype's RamEstimator computes a node's memory from the voxel counts of its image inputs just before
it runs: ``overhead + sum(voxels x bytes per voxel)``. The per-voxel terms count the float32/float64
arrays each node holds at once; the totals were checked against measured peaks: every MultiProc run
writes each node's peak resident memory to ``<work>/node_memory.tsv``, and on the small phantom
(FLAIR 144x120x120, QSM 96x96x48) nodes peaked at 0.17-0.51 GB (worker baseline included) where these
estimates give 0.27-0.81 GB; the full-size participant's largest process peaked at 1.1 GB (docs/performance.md),
where the FLAIR N4 and registration estimates are 1.1 and 1.15 GB. Estimates are rounded up: a node over-estimated waits a little,
one under-estimated can push a run past --mem-gb.
"""
from __future__ import annotations

from nipype import Workflow
from nipype.utils.ram_estimator import RamEstimator

#: node name -> (fixed GB of the worker process and its libraries, {input: bytes per voxel})
NODE_MEMORY: dict[str, tuple[float, dict[str, float]]] = {
    "qsm_ppb": (0.25, {"in_file": 60}),
    "flair_n4": (0.25, {"in_file": 80}),
    "magnitude_n4": (0.25, {"in_file": 80}),
    "flair_to_qsm_xfm": (0.3, {"moving_file": 60, "fixed_file": 60}),
    "flair_in_qsm": (0.25, {"in_file": 24, "reference_file": 24}),
    "mask_in_qsm": (0.25, {"in_file": 24, "reference_file": 24}),
    "rim_in_qsm": (0.25, {"in_file": 24, "reference_file": 24}),
    "lesion_instances": (0.25, {"mask_file": 40}),
    "lesion_patches": (0.25, {"qsm_file": 40, "flair_file": 16}),
    "lesion_radiomics": (0.5, {"qsm_file": 24}),
    "rim_classification": (0.8, {"instances_file": 24}),
}


def set_memory_estimates(wf: Workflow) -> None:
    """Attach a RamEstimator to every node of ``wf`` named in NODE_MEMORY."""
    for name in wf.list_node_names():
        if name in NODE_MEMORY:
            overhead, per_voxel = NODE_MEMORY[name]
            node = wf.get_node(name)
            node._mem_gb = overhead  # nipype has no public setter; the estimator refines it
            node.ram_estimator = RamEstimator(input_multipliers=per_voxel, overhead_gb=overhead,
                                              min_gb=overhead, max_gb=64.0)
