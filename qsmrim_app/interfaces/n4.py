"""N4 bias-field correction of the FLAIR (and magnitude) before registration and patches."""
from __future__ import annotations

import SimpleITK as sitk
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import n4_correct
from ._base import load_3d, out_path


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, desc="foreground mask (default: Otsu)")
    shrink_factor = traits.Int(4, usedefault=True)
    iterations = traits.List(traits.Int, value=[50, 50, 30], usedefault=True)
    convergence = traits.Float(1e-4, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads (--omp-nthreads)")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True)
    bias_file = File(exists=True)


class N4BiasCorrection(SimpleInterface):
    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        load_3d(self.inputs.in_file, "image for N4")  # one clear message for 4D/corrupt inputs
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.inputs.num_threads)
        image = sitk.ReadImage(self.inputs.in_file, sitk.sitkFloat32)
        mask = sitk.ReadImage(self.inputs.mask_file, sitk.sitkUInt8) if self.inputs.mask_file else None
        corrected, bias = n4_correct(image, mask, shrink_factor=self.inputs.shrink_factor,
                                     iterations=tuple(self.inputs.iterations),
                                     convergence=self.inputs.convergence)
        self._results["out_file"] = out_path("n4_corrected.nii.gz")
        self._results["bias_file"] = out_path("n4_bias.nii.gz")
        sitk.WriteImage(corrected, self._results["out_file"])
        sitk.WriteImage(bias, self._results["bias_file"])
        return runtime
