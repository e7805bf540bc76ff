"""Bring the QSM map to the app's convention: ppb, finite, with its brain mask."""
from __future__ import annotations

import logging

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..qsm import brain_mask, guess_units, to_ppb
from ._base import InputDataError, load_3d, save_like

LOGGER = logging.getLogger("nipype.interface")


class _PrepareQSMInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="QSM map (Chimap)")
    units = traits.Enum("ppm", "ppb", mandatory=True, desc="units of in_file")


class _PrepareQSMOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="QSM in ppb, non-finite voxels set to 0")
    mask_file = File(exists=True, desc="brain mask (support of the map)")
    n_nonfinite = traits.Int(desc="voxels that were NaN/Inf and were masked")
    warnings = traits.List(traits.Str)


class PrepareQSM(SimpleInterface):
    """Convert to ppb, report and mask NaN/Inf, derive the brain mask."""

    input_spec = _PrepareQSMInputSpec
    output_spec = _PrepareQSMOutputSpec

    def _run_interface(self, runtime):
        image = load_3d(self.inputs.in_file, "QSM map")
        data = np.asarray(image.dataobj, dtype=np.float32)
        finite = np.isfinite(data)
        if not finite.any() or not np.any(data[finite] != 0):
            raise InputDataError(f"QSM map {self.inputs.in_file}: contains no finite non-zero value; "
                                 "check the reconstruction output")
        warnings = []
        n_nonfinite = int((~finite).sum())
        if n_nonfinite:
            warnings.append(f"QSM map {self.inputs.in_file}: {n_nonfinite} NaN/Inf voxels set to 0 and masked out")
        guessed = guess_units(data)
        if guessed is not None and guessed != self.inputs.units:
            warnings.append(f"QSM map {self.inputs.in_file}: values look like {guessed}, but {self.inputs.units} "
                            f"was assumed; pass --qsm-units {guessed} if the map is not BIDS-conformant")
        for message in warnings:
            LOGGER.warning(message)
        data = np.where(finite, data, 0.0).astype(np.float32)
        mask = brain_mask(data)
        self._results["out_file"] = save_like(to_ppb(data, self.inputs.units) * mask, image,
                                              "qsm_ppb.nii.gz", np.float32)
        self._results["mask_file"] = save_like(mask, image, "qsm_brainmask.nii.gz", np.uint8)
        self._results["n_nonfinite"] = n_nonfinite
        self._results["warnings"] = warnings
        return runtime
