"""Lesion instances: confluent lesions split in the mask's own grid, then instances in the QSM grid,
their geometry, and the expert rim labels carried onto them."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..lesion_split import LESION_THRESHOLD, MASK_KINDS, SPLIT_METHODS, LesionValueError, SplitParams, prepare_lesions, voxel_sizes
from ..lesions import MIN_LESION_VOXELS, LesionMaskError, carry_rim_labels, label_instances, lesion_geometry, with_split_from
from ._base import InputDataError, load_3d, out_path, save_like

LOGGER = logging.getLogger("nipype.interface")


#: Largest share of the image a lesion mask may mark (lesion loads are a few % of the brain).
MAX_LESION_FRACTION = 0.5


class _PrepareInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="lesion file in its own grid (FLAIR or QSM)")
    source_file = traits.Str(desc="the original lesion file, named in messages")
    kind = traits.Enum(*MASK_KINDS, mandatory=True)
    split = traits.Enum(*SPLIT_METHODS, usedefault=True)
    threshold = traits.Float(LESION_THRESHOLD, usedefault=True, desc="probability maps: lesion where value >= this")
    sigma_mm = traits.Float(SplitParams().sigma_mm, usedefault=True)
    min_centre_mm3 = traits.Float(SplitParams().min_centre_mm3, usedefault=True)
    notes = traits.List(traits.Str, desc="discovery notes about this file (e.g. a soft mask read as probability)")


class _PrepareOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="instance map (int32) or, with split none, 0/1 mask, same grid")
    split_file = File(exists=True, desc="TSV lesion_id, split_from (component id of split lesions)")
    n_components = traits.Int()
    is_instance_map = traits.Bool(desc="out_file holds lesion ids (split), not a 0/1 mask (--lesion-split none)")
    messages = traits.List(traits.Str)


class PrepareLesionMask(SimpleInterface):
    """Binary masks and probability maps become lesion instances in the grid they were drawn on."""

    input_spec = _PrepareInputSpec
    output_spec = _PrepareOutputSpec

    def _run_interface(self, runtime):
        source = self.inputs.source_file or self.inputs.mask_file
        image = load_3d(self.inputs.mask_file, "lesion mask")
        params = SplitParams(sigma_mm=self.inputs.sigma_mm, min_centre_mm3=self.inputs.min_centre_mm3)
        try:
            prepared = prepare_lesions(np.asanyarray(image.dataobj), voxel_sizes(image.affine), self.inputs.kind,
                                       split=self.inputs.split, threshold=self.inputs.threshold, params=params)
        except LesionValueError as exc:
            raise InputDataError(f"lesion mask {source}: {exc}") from exc
        dtype = np.int32 if prepared.is_instance_map else np.uint8
        self._results["out_file"] = save_like(prepared.data, image, "lesion_instances_native.nii.gz", dtype)
        self._results["split_file"] = out_path("lesion_split.tsv")
        pd.DataFrame({"lesion_id": list(prepared.split_from), "split_from": list(prepared.split_from.values())},
                     dtype="int64").to_csv(self._results["split_file"], sep="\t", index=False)
        messages = list(self.inputs.notes or []) + [f"lesion mask {source}: {m}" for m in prepared.messages]
        for message in messages:
            LOGGER.info(message)
        self._results["n_components"] = prepared.n_components
        self._results["is_instance_map"] = bool(prepared.is_instance_map)
        self._results["messages"] = messages
        return runtime


class _LesionsInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="lesion mask in the QSM grid")
    source_file = traits.Str(desc="the original mask file, named in messages")
    is_instance_map = traits.Bool(False, usedefault=True)
    min_voxels = traits.Int(MIN_LESION_VOXELS, usedefault=True)
    rim_file = File(exists=True, desc="rim annotations (1 rim-, 2 rim+) in the QSM grid")
    split_file = File(exists=True, desc="TSV lesion_id, split_from from PrepareLesionMask")
    split_messages = traits.List(traits.Str, desc="messages of the split, passed on to the report")


class _LesionsOutputSpec(TraitedSpec):
    instances_file = File(exists=True)
    geometry_file = File(exists=True, desc="lesion_id, voxels, volume, centroid (world mm)")
    annotations_file = File(desc="lesion_id, rim_positive, agreement (only with rim_file)")
    dseg_tsv_file = File(exists=True, desc="BIDS dseg.tsv look-up table: index, name")
    n_lesions = traits.Int()
    n_dropped = traits.Int()
    messages = traits.List(traits.Str)


class LesionInstances(SimpleInterface):
    input_spec = _LesionsInputSpec
    output_spec = _LesionsOutputSpec

    def _run_interface(self, runtime):
        source = self.inputs.source_file or self.inputs.mask_file
        image = load_3d(self.inputs.mask_file, "lesion mask")
        mask = np.asarray(image.dataobj)
        covered = float(np.count_nonzero(mask)) / max(1, mask.size)
        if covered > MAX_LESION_FRACTION:  # e.g. a brain mask or an inverted mask given as the lesion mask
            raise InputDataError(f"lesion mask {source}: {covered:.0%} of the image is marked as lesion, which no "
                                 "MS lesion load comes near; give a mask with 1 (or a lesion id) at lesion voxels "
                                 "and 0 elsewhere, not a brain mask or an inverted mask")
        try:
            found = label_instances(mask, min_voxels=self.inputs.min_voxels,
                                    is_instance_map=self.inputs.is_instance_map)
        except LesionMaskError as exc:
            raise InputDataError(f"lesion mask {source}: {exc}") from exc
        messages = list(self.inputs.split_messages or [])
        if found.dropped:
            messages.append(f"lesion mask {source}: {found.dropped} component(s) smaller than "
                            f"{self.inputs.min_voxels} voxels dropped (--min-lesion-voxels)")
        self._results["instances_file"] = save_like(found.labels, image, "lesions_dseg.nii.gz", np.int32)
        split_from = {}
        if self.inputs.split_file:
            split = pd.read_csv(self.inputs.split_file, sep="\t")
            split_from = dict(zip(split["lesion_id"].astype(int), split["split_from"].astype(int)))
        geometry = with_split_from(lesion_geometry(found.labels, image.affine), split_from)
        self._results["geometry_file"] = out_path("lesion_geometry.tsv")
        geometry.to_csv(self._results["geometry_file"], sep="\t", index=False, na_rep="n/a")
        self._results["dseg_tsv_file"] = out_path("lesions_dseg.tsv")
        pd.DataFrame({"index": geometry["lesion_id"], "name": [f"lesion-{i}" for i in geometry["lesion_id"]],
                      "split_from": geometry["split_from"]}
                     ).to_csv(self._results["dseg_tsv_file"], sep="\t", index=False, na_rep="n/a")
        if self.inputs.rim_file:
            rim = np.asarray(load_3d(self.inputs.rim_file, "rim annotation").dataobj)
            try:
                labels = carry_rim_labels(found.labels, rim)
            except LesionMaskError as exc:
                raise InputDataError(f"rim annotation {self.inputs.rim_file}: {exc}") from exc
            ids = list(found.lesion_ids)
            table = pd.DataFrame({
                "lesion_id": ids,
                "rim_positive": [labels.labels.get(i, np.nan) for i in ids],
                "agreement": [labels.agreement.get(i, np.nan) for i in ids],
            })
            if labels.missing:
                messages.append(f"rim annotation: lesions {list(labels.missing)} have no rim label "
                                "and are left out of training")
            if labels.disagreeing:
                messages.append(f"rim annotation: lesions {list(labels.disagreeing)} have voxels with "
                                "both rim+ and rim- labels; the majority label is used")
            self._results["annotations_file"] = out_path("lesion_annotations.tsv")
            table.to_csv(self._results["annotations_file"], sep="\t", index=False, na_rep="n/a")
        for message in messages:
            LOGGER.warning(message)
        self._results["n_lesions"] = len(found.lesion_ids)
        self._results["n_dropped"] = int(found.dropped)
        self._results["messages"] = messages
        return runtime
