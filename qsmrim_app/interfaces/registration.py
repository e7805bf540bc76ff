"""FLAIR-to-QSM registration and resampling into the QSM grid."""
from __future__ import annotations

import json

import SimpleITK as sitk
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import (RegistrationError, otsu_foreground, read_transform, register_without_magnitude,
                            resample_to_reference, write_transform)
from ..registration_gate import GATE_THRESHOLD_MM, register_magnitude_gated, registration_gate
from ._base import InputDataError, out_path


class _RegisterInputSpec(BaseInterfaceInputSpec):
    fixed_file = File(exists=True, mandatory=True, desc="magnitude (preferred) or QSM, QSM grid")
    moving_file = File(exists=True, mandatory=True, desc="N4-corrected FLAIR")
    fixed_mask_file = File(exists=True, desc="brain mask in the QSM grid")
    max_metric = traits.Float(desc="final Mattes MI above this is a failed registration")
    fixed_is_qsm = traits.Bool(False, usedefault=True,
                               desc="no magnitude: brain outlines, then Mattes MI to a stand-in of the QSM")
    num_threads = traits.Int(1, usedefault=True)
    mode = traits.Enum("rigid", "affine", "header", usedefault=True,
                       desc="rigid only, rigid then affine, or the headers as they are (no optimisation)")
    gate_threshold_mm = traits.Float(GATE_THRESHOLD_MM, usedefault=True,
                                     desc="registration gate: outline disagreement (mm) above which it fails")
    source_fixed = traits.Str(desc="the input file behind fixed_file, named in errors")
    source_moving = traits.Str(desc="the input file behind moving_file, named in errors")


class _RegisterOutputSpec(TraitedSpec):
    transform_file = File(exists=True, desc="ITK transform, QSM physical points -> FLAIR physical points")
    report_file = File(exists=True, desc="JSON: mode, metric before/after, each stage's metric, initialisation")
    sidecar_file = File(exists=True, desc="JSON fields for the transform's sidecar (no work-dir paths)")
    metric_before = traits.Float()
    metric_after = traits.Float()
    initialisation = traits.Str()
    gate_value_mm = traits.Float(desc="registration gate value: brain-outline disagreement in mm")
    gate_passed = traits.Bool()


class RegisterFLAIRToQSM(SimpleInterface):
    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        fixed = sitk.ReadImage(self.inputs.fixed_file, sitk.sitkFloat32)
        moving = sitk.ReadImage(self.inputs.moving_file, sitk.sitkFloat32)
        qsm_mask = (sitk.ReadImage(self.inputs.fixed_mask_file, sitk.sitkUInt8) if self.inputs.fixed_mask_file
                    else None)
        target = "QSM-derived stand-in (no magnitude)" if self.inputs.fixed_is_qsm else "magnitude"
        # the QSM's support (nonzero voxels), or the magnitude's foreground: the brain the gate compares
        gate_mask = qsm_mask if qsm_mask is not None else (
            sitk.Cast(sitk.NotEqual(fixed, 0.0), sitk.sitkUInt8) if self.inputs.fixed_is_qsm
            else otsu_foreground(fixed))
        if self.inputs.mode == "header":
            transform, sidecar = sitk.Euler3DTransform(), {"Initialisation": "header"}
            target = "none (the headers, no optimisation)"
            gate, retry = registration_gate(gate_mask, moving, transform, self.inputs.gate_threshold_mm), {}
        else:
            result, gate, retry = self._register(fixed, moving, qsm_mask, gate_mask)
            transform = result.transform
            sidecar = {"Metric": "MattesMutualInformation", "Initialisation": result.initialisation,
                       "MetricBefore": float(result.metric_before), "MetricAfter": float(result.metric_after)}
            for stage in result.stages:  # flat keys: the report shows them as one table
                sidecar[f"Stage{stage.name.capitalize()}Metric"] = float(stage.metric)
                sidecar[f"Stage{stage.name.capitalize()}Iterations"] = int(stage.iterations)
        sidecar = {"RegistrationMode": self.inputs.mode, "RegistrationTarget": target, **sidecar,
                   **gate.sidecar(), **retry}
        self._results["transform_file"] = out_path("flair_to_qsm_xfm.txt")
        write_transform(transform, self._results["transform_file"])
        report = {**sidecar, "FixedImage": self.inputs.fixed_file, "MovingImage": self.inputs.moving_file}
        for key, content in (("report_file", report), ("sidecar_file", sidecar)):
            self._results[key] = out_path(f"registration_{key.split('_')[0]}.json")
            with open(self._results[key], "w") as handle:
                json.dump(content, handle, indent=2)
        self._results["metric_before"] = float(sidecar.get("MetricBefore", float("nan")))
        self._results["metric_after"] = float(sidecar.get("MetricAfter", float("nan")))
        self._results["initialisation"] = sidecar["Initialisation"]
        self._results["gate_value_mm"] = gate.value_mm
        self._results["gate_passed"] = gate.passed
        return runtime

    def _register(self, fixed: sitk.Image, moving: sitk.Image, qsm_mask: sitk.Image | None,
                  gate_mask: sitk.Image):
        """The registration and its gate (a magnitude answer that fails it is retried from the brain outlines)."""
        kwargs = {"threads": self.inputs.num_threads, "affine": self.inputs.mode == "affine"}
        if self.inputs.max_metric:
            kwargs["max_metric"] = self.inputs.max_metric
        threshold = self.inputs.gate_threshold_mm
        try:
            if self.inputs.fixed_is_qsm:
                result = register_without_magnitude(fixed, moving, qsm_mask, **kwargs)
                return result, registration_gate(gate_mask, moving, result.transform, threshold), {}
            gated = register_magnitude_gated(fixed, moving, qsm_mask, gate_mask, threshold, **kwargs)
            return gated.result, gated.gate, gated.retry
        except RegistrationError as exc:
            raise InputDataError(
                f"registration of FLAIR {self.inputs.source_moving or self.inputs.moving_file} to "
                f"{self.inputs.source_fixed or self.inputs.fixed_file} failed: {exc}; check that both images "
                "show the same head (same session) and that their headers are sane") from exc


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
