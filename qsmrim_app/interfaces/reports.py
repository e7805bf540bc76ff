"""The participant's HTML report, made from the written derivatives (nothing is recomputed)."""
from __future__ import annotations

import json

from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface,
                                    TraitedSpec, traits)

from .. import derivatives as drv


class _ReportInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str()
    qsm_file = File(exists=True, mandatory=True, desc="the input QSM map")
    qsm_units = traits.Str("ppm", usedefault=True)
    derivative_files = traits.List(File(exists=True), desc="written derivatives (orders the node last)")
    registration_file = File(exists=True)
    inputs_found = traits.Dict()
    qsm_messages = traits.List(traits.Str)
    lesion_messages = traits.List(traits.Str)
    patch_messages = traits.List(traits.Str)


class _ReportOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ParticipantReport(SimpleInterface):
    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec
    always_run = True  # it writes into the staging tree, which may have been cleaned since it was cached

    def _run_interface(self, runtime):
        from ..reports.participant import write_participant_report

        unit = drv.Unit(self.inputs.subject, self.inputs.session or None)
        root = self.inputs.base_directory
        table = drv.read_tsv(drv.output_path(root, unit, "rim_lesions"))
        summary = drv.read_tsv(drv.output_path(root, unit, "summary")).iloc[0].to_dict()
        registration = None
        if self.inputs.registration_file:
            with open(self.inputs.registration_file) as handle:
                registration = json.load(handle)
        annotations_file = drv.output_path(root, unit, "annotations")  # staged only when rim labels were given
        annotations = drv.read_tsv(annotations_file) if annotations_file.is_file() else None
        messages = [*self.inputs.qsm_messages, *self.inputs.lesion_messages, *self.inputs.patch_messages]
        out = write_participant_report(
            drv.report_path(root, unit), subject=unit.subject, session=unit.session,
            qsm=self.inputs.qsm_file, flair_in_qsm=drv.output_path(root, unit, "flair_preproc"),
            lesions_dseg=drv.output_path(root, unit, "lesions_dseg"), lesion_table=table, summary=summary,
            inputs=dict(self.inputs.inputs_found), versions=drv.versions(), registration=registration,
            messages=messages, qsm_units=self.inputs.qsm_units, annotations=annotations)
        self._results["out_file"] = str(out)
        return runtime
