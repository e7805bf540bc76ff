"""Classify a participant's lesions with the model ensemble and paint the results into the QSM grid."""
from __future__ import annotations

import numpy as np
import pandas as pd
from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface,
                                    TraitedSpec, traits)

from ..inference import classify_lesions, paint_lesions
from ..model.counts import count_columns
from ._base import load_3d, out_path, save_like


class _ClassifyInputSpec(BaseInterfaceInputSpec):
    patches_file = File(exists=True, mandatory=True)
    features_file = File(exists=True, mandatory=True)
    instances_file = File(exists=True, mandatory=True)
    model_dir = Directory(exists=True, mandatory=True)
    threshold = traits.Float(desc="explicit probability threshold (overrides the operating point)")
    operating_point = traits.Enum("f1", "high-sensitivity", usedefault=True)
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str(desc="session label, if any")


class _ClassifyOutputSpec(TraitedSpec):
    table_file = File(exists=True)
    mask_file = File(exists=True)
    probseg_file = File(exists=True)
    summary_file = File(exists=True, desc="one-row TSV: the participant's counts and volumes")


class ClassifyLesions(SimpleInterface):
    input_spec = _ClassifyInputSpec
    output_spec = _ClassifyOutputSpec

    def _run_interface(self, runtime):
        result = classify_lesions(self.inputs.patches_file, self.inputs.features_file, self.inputs.model_dir,
                                  threshold=self.inputs.threshold if self.inputs.threshold else None,
                                  operating_point=self.inputs.operating_point, device=self.inputs.device)
        image = load_3d(self.inputs.instances_file, "lesions")
        instances = np.asarray(image.dataobj).astype(np.int32)
        table = result.table
        probability = paint_lesions(instances, table["lesion_id"], table["probability"])
        positive = paint_lesions(instances, table["lesion_id"], table["rim_positive"]) > 0
        self._results["probseg_file"] = save_like(probability, image, "rimplus_probseg.nii.gz", np.float32)
        self._results["mask_file"] = save_like(positive, image, "rimplus_mask.nii.gz", np.uint8)
        self._results["table_file"] = out_path("rim_lesions.tsv")
        table.to_csv(self._results["table_file"], sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        summary = {
            "participant_id": f"sub-{self.inputs.subject}",
            "session": self.inputs.session or "n/a",
            "n_lesions": int(len(table)),
            "n_rimplus": int(table["rim_positive"].sum()),
            "lesion_volume_mm3": float(table["volume_mm3"].sum()),
            "rimplus_volume_mm3": float(table.loc[table["rim_positive"] == 1, "volume_mm3"].sum()),
            "threshold": result.threshold,
            "operating_point": result.operating_point,
            "model_id": result.model_id,
            **count_columns(table["probability"].to_numpy(float)),  # expected count + 95 % interval
            "calibration": result.calibration,
        }
        self._results["summary_file"] = out_path("summary.tsv")
        pd.DataFrame([summary]).to_csv(self._results["summary_file"], sep="\t", index=False, na_rep="n/a")
        return runtime
