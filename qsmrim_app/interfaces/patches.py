"""Per-lesion physical-space patches, local references and radial-profile features (one pass)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..patches import DEFAULT_EXTENT_MM, DEFAULT_SPACING_MM, PatchGrid, extract_patches, normalise_flair, save_patches
from ..radial import FLOOR_COLUMN, feature_names, radial_table, shell_minus_core_ppb
from ..reference import local_references
from ._base import load_3d, out_path

LOGGER = logging.getLogger("nipype.interface")


class _PatchesInputSpec(BaseInterfaceInputSpec):
    qsm_file = File(exists=True, mandatory=True, desc="QSM in ppb")
    flair_file = File(exists=True, mandatory=True, desc="FLAIR in the QSM grid")
    instances_file = File(exists=True, mandatory=True)
    brain_mask_file = File(exists=True, mandatory=True)
    extent_mm = traits.Tuple(traits.Float, traits.Float, traits.Float, value=DEFAULT_EXTENT_MM, usedefault=True)
    spacing_mm = traits.Tuple(traits.Float, traits.Float, traits.Float, value=DEFAULT_SPACING_MM, usedefault=True)


class _PatchesOutputSpec(TraitedSpec):
    patches_file = File(exists=True)
    radial_file = File(exists=True, desc="lesion_id + radial-profile features + the floor score")
    messages = traits.List(traits.Str)


class ExtractPatches(SimpleInterface):
    input_spec = _PatchesInputSpec
    output_spec = _PatchesOutputSpec

    def _run_interface(self, runtime):
        qsm_image = load_3d(self.inputs.qsm_file, "QSM")
        qsm = np.asarray(qsm_image.dataobj, dtype=np.float32)
        flair = np.asarray(load_3d(self.inputs.flair_file, "FLAIR").dataobj, dtype=np.float32)
        instances = np.asarray(load_3d(self.inputs.instances_file, "lesions").dataobj).astype(np.int32)
        brain = np.asarray(load_3d(self.inputs.brain_mask_file, "brain mask").dataobj) > 0
        grid = PatchGrid(tuple(self.inputs.extent_mm), tuple(self.inputs.spacing_mm))
        zooms = tuple(float(z) for z in qsm_image.header.get_zooms()[:3])
        coarse = [z for z, e in zip(sorted(zooms), sorted(grid.extent_mm)) if z > e / 4]
        if coarse:
            raise ValueError(f"{self.inputs.qsm_file}: QSM voxels of {zooms} mm are too coarse for "
                             f"{list(grid.extent_mm)} mm patches (fewer than 4 voxels across)")
        lesion_ids = [int(v) for v in np.unique(instances) if v > 0]
        flair_norm = normalise_flair(flair, brain, instances > 0)
        patchset = extract_patches(qsm, flair_norm, instances, lesion_ids, qsm_image.affine, grid)
        reference, _ = local_references(qsm, instances, brain, lesion_ids, zooms)
        patchset = type(patchset)(patchset.patches, patchset.lesion_ids, grid, reference, patchset.cropped)
        messages = []
        if patchset.cropped:
            messages.append(f"lesions {list(patchset.cropped)} extend beyond the "
                            f"{'x'.join(f'{e:g}' for e in grid.extent_mm)} mm patch and were cropped around "
                            "their centre")
            LOGGER.warning(messages[-1])
        self._results["patches_file"] = out_path("lesion_patches.npz")
        save_patches(self._results["patches_file"], patchset, zooms)
        table = pd.DataFrame(radial_table(patchset.patches, reference, grid.spacing_mm), columns=feature_names())
        table.insert(0, "lesion_id", lesion_ids)
        table[FLOOR_COLUMN] = shell_minus_core_ppb(qsm, instances, lesion_ids)
        self._results["radial_file"] = out_path("lesion_radial.tsv")
        table.to_csv(self._results["radial_file"], sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        self._results["messages"] = messages
        return runtime
