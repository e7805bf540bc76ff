"""Per-lesion two-channel patches (QSM, normalised FLAIR) for the image branch."""
from __future__ import annotations

import logging

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..patches import extract_patches, normalise_flair, save_patches
from ._base import load_3d, out_path

LOGGER = logging.getLogger("nipype.interface")


class _PatchesInputSpec(BaseInterfaceInputSpec):
    qsm_file = File(exists=True, mandatory=True, desc="QSM in ppb")
    flair_file = File(exists=True, mandatory=True, desc="FLAIR in the QSM grid")
    instances_file = File(exists=True, mandatory=True)
    brain_mask_file = File(exists=True, mandatory=True)
    patch_size = traits.Tuple(traits.Int, traits.Int, traits.Int, value=(32, 32, 16), usedefault=True)


class _PatchesOutputSpec(TraitedSpec):
    patches_file = File(exists=True)
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
        lesion_ids = [int(v) for v in np.unique(instances) if v > 0]
        flair_norm = normalise_flair(flair, brain, instances > 0)
        patchset = extract_patches(qsm, flair_norm, instances, lesion_ids, size=tuple(self.inputs.patch_size))
        messages = []
        if patchset.cropped:
            messages.append(f"lesions {list(patchset.cropped)} are larger than the "
                            f"{'x'.join(map(str, self.inputs.patch_size))} patch and were cropped around their centre")
            LOGGER.warning(messages[-1])
        self._results["patches_file"] = out_path("lesion_patches.npz")
        save_patches(self._results["patches_file"], patchset, qsm_image.header.get_zooms()[:3])
        self._results["messages"] = messages
        return runtime
