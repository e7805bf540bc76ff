"""FLAIR-to-QSM registration and resampling into the QSM grid."""
from __future__ import annotations

import json

import SimpleITK as sitk
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import (RegistrationError, qsm_registration_target, read_transform, register_flair_to_qsm, resample_to_reference,
                            write_transform)
from ._base import InputDataError, out_path


class _RegisterInputSpec(BaseInterfaceInputSpec):
    fixed_file = File(exists=True, mandatory=True, desc="magnitude (preferred) or QSM, QSM grid")
    moving_file = File(exists=True, mandatory=True, desc="N4-corrected FLAIR")
    fixed_mask_file = File(exists=True, desc="brain mask in the QSM grid")
    max_metric = traits.Float(desc="final Mattes MI above this is a failed registration")
    fixed_is_qsm = traits.Bool(False, usedefault=True,
                               desc="no magnitude: register to a positive, smoothed stand-in of the QSM")
    num_threads = traits.Int(1, usedefault=True)
    mode = traits.Enum("rigid", "affine", usedefault=True, desc="rigid only, or rigid then affine")
    source_fixed = traits.Str(desc="the input file behind fixed_file, named in errors")
    source_moving = traits.Str(desc="the input file behind moving_file, named in errors")


class _RegisterOutputSpec(TraitedSpec):
    transform_file = File(exists=True, desc="ITK transform, QSM physical points -> FLAIR physical points")
    report_file = File(exists=True, desc="JSON: mode, metric before/after, each stage's metric, initialisation")
    sidecar_file = File(exists=True, desc="JSON fields for the transform's sidecar (no work-dir paths)")
    metric_before = traits.Float()
    metric_after = traits.Float()
    initialisation = traits.Str()


class RegisterFLAIRToQSM(SimpleInterface):
    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        fixed = sitk.ReadImage(self.inputs.fixed_file, sitk.sitkFloat32)
        moving = sitk.ReadImage(self.inputs.moving_file, sitk.sitkFloat32)
        kwargs = {"threads": self.inputs.num_threads}
        if self.inputs.fixed_mask_file:
            kwargs["fixed_mask"] = sitk.ReadImage(self.inputs.fixed_mask_file, sitk.sitkUInt8)
        if self.inputs.fixed_is_qsm:
            fixed = qsm_registration_target(fixed, kwargs.get("fixed_mask"))
        if self.inputs.max_metric:
            kwargs["max_metric"] = self.inputs.max_metric
        try:
            result = register_flair_to_qsm(fixed, moving, affine=self.inputs.mode == "affine", **kwargs)
        except RegistrationError as exc:
            raise InputDataError(
                f"registration of FLAIR {self.inputs.source_moving or self.inputs.moving_file} to "
                f"{self.inputs.source_fixed or self.inputs.fixed_file} failed: {exc}; check that both images "
                "show the same head (same session) and that their headers are sane") from exc
        self._results["transform_file"] = out_path("flair_to_qsm_xfm.txt")
        write_transform(result.transform, self._results["transform_file"])
        sidecar = {"RegistrationMode": self.inputs.mode, "Metric": "MattesMutualInformation",
                   "Initialisation": result.initialisation, "MetricBefore": float(result.metric_before),
                   "MetricAfter": float(result.metric_after)}
        for stage in result.stages:  # flat keys: the report shows them as one table
            sidecar[f"Stage{stage.name.capitalize()}Metric"] = float(stage.metric)
            sidecar[f"Stage{stage.name.capitalize()}Iterations"] = int(stage.iterations)
        report = {**sidecar, "FixedImage": self.inputs.fixed_file, "MovingImage": self.inputs.moving_file}
        for key, content in (("report_file", report), ("sidecar_file", sidecar)):
            self._results[key] = out_path(f"registration_{key.split('_')[0]}.json")
            with open(self._results[key], "w") as handle:
                json.dump(content, handle, indent=2)
        self._results["metric_before"] = float(result.metric_before)
        self._results["metric_after"] = float(result.metric_after)
        self._results["initialisation"] = result.initialisation
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    reference_file = File(exists=True, mandatory=True, desc="defines the output grid (QSM)")
    transform_file = File(exists=True, desc="ITK transform; identity (header-based) when absent")
    interpolation = traits.Enum("linear", "bspline", "nearest", usedefault=True)
    out_name = traits.Str("resampled.nii.gz", usedefault=True)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyTransform(SimpleInterface):
    """Resample into the QSM grid; nearest neighbour keeps lesion instance labels exact."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        pixel = sitk.sitkUnknown if self.inputs.interpolation == "nearest" else sitk.sitkFloat32
        image = sitk.ReadImage(self.inputs.in_file, pixel)
        reference = sitk.ReadImage(self.inputs.reference_file)
        transform = (read_transform(self.inputs.transform_file) if self.inputs.transform_file
                     else sitk.Transform(3, sitk.sitkIdentity))
        resampled = resample_to_reference(image, reference, transform,
                                          interpolation=self.inputs.interpolation)
        self._results["out_file"] = out_path(self.inputs.out_name)
        sitk.WriteImage(resampled, self._results["out_file"])
        return runtime
