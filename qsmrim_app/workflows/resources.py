"""Memory estimates of the participant nodes, so MultiProc schedules within --mem-gb.

nipype's RamEstimator computes a node's memory from the voxel counts of its image inputs just before
it runs: ``overhead + sum(voxels x bytes per voxel)``. The numbers below come from the peak resident
memory each node used (``<work>/node_memory.tsv``, written by every MultiProc run; see
``benchmarks/bench_cohort.py``), on the small and the full-size phantom, rounded up.
"""
from __future__ import annotations

from nipype import Workflow
from nipype.utils.ram_estimator import RamEstimator

#: node name -> (fixed GB of the worker process and its libraries, {input: bytes per voxel})
NODE_MEMORY: dict[str, tuple[float, dict[str, float]]] = {
    "qsm_ppb": (0.25, {"in_file": 60}),
    "flair_n4": (0.25, {"in_file": 60}),
    "magnitude_n4": (0.25, {"in_file": 60}),
    "flair_to_qsm_xfm": (0.3, {"moving_file": 40, "fixed_file": 40}),
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
