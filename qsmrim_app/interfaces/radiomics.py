"""The 527 pyradiomics features per lesion on the QSM (ppb)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..derivatives import radiomics_dictionary
from ..radiomics import RadiomicsInputError, extract_lesion_features
from ._base import InputDataError, load_3d, out_path


class _RadiomicsInputSpec(BaseInterfaceInputSpec):
    qsm_file = File(exists=True, mandatory=True, desc="QSM in ppb")
    instances_file = File(exists=True, mandatory=True)
    geometry_file = File(exists=True, mandatory=True, desc="lesion geometry table (first columns)")
    params = traits.Dict(mandatory=True, desc="pyradiomics parameters, validated once (radiomics.load_params)")
    nprocs = traits.Int(1, usedefault=True)
    extra_features_file = File(exists=True, desc="lesion_id + more feature columns (radial profile) to append")
    source_file = traits.Str(desc="the input QSM map qsm_file was made from (named in errors)")
    source_units = traits.Str(desc="the units the input map was read in (named in errors)")


class _RadiomicsOutputSpec(TraitedSpec):
    features_file = File(exists=True)
    dictionary_file = File(exists=True, desc="JSON data dictionary of the table's columns")


class RadiomicFeatures(SimpleInterface):
    input_spec = _RadiomicsInputSpec
    output_spec = _RadiomicsOutputSpec

    def _run_interface(self, runtime):
        qsm_image = load_3d(self.inputs.qsm_file, "QSM")
        qsm = np.asarray(qsm_image.dataobj, dtype=np.float32)
        instances = np.asarray(load_3d(self.inputs.instances_file, "lesions").dataobj).astype(np.int32)
        geometry = pd.read_csv(self.inputs.geometry_file, sep="\t")
        try:
            features = extract_lesion_features(qsm, instances, tuple(float(z) for z in qsm_image.header.get_zooms()[:3]),
                                               geometry["lesion_id"].tolist(), self.inputs.params,
                                               nprocs=self.inputs.nprocs)
        except RadiomicsInputError as err:
            source = self.inputs.source_file or self.inputs.qsm_file
            units = self.inputs.source_units or "?"
            fix = ("if the map is stored in ppb, pass --qsm-units ppb" if units == "ppm" else
                   "check the map's units (--qsm-units) and its reconstruction")
            raise InputDataError(f"QSM map {source}: {err}. It was read as {units}: its values are probably in "
                                 f"the wrong unit; {fix}") from None
        table = geometry.merge(features, on="lesion_id", how="left", validate="one_to_one")
        if self.inputs.extra_features_file:
            extra = pd.read_csv(self.inputs.extra_features_file, sep="\t", na_values=["n/a"], keep_default_na=False)
            table = table.merge(extra, on="lesion_id", how="left", validate="one_to_one")
        self._results["features_file"] = out_path("lesion_radiomics.tsv")
        table.to_csv(self._results["features_file"], sep="\t", index=False, na_rep="n/a", float_format="%.10g")
        self._results["dictionary_file"] = out_path("lesion_radiomics.json")
        with open(self._results["dictionary_file"], "w") as handle:
            json.dump(radiomics_dictionary(table.columns), handle, indent=1)
        return runtime
