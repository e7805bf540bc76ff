"""The participant level: one nipype workflow per participant/session, all units in one graph.

N4 -> register FLAIR to QSM -> resample -> lesion instances -> patches + radiomics -> classify -> sink
-> publish. Every step is a cached nipype node in the work directory, so an interrupted run resumes
where it stopped. The sinks write into the work dir's staging tree; the unit's last node publishes the
complete set into the output dir, so a failed unit leaves nothing there (and keeps what an earlier
complete run published). With MultiProc, every unit runs in one graph under --nprocs / --mem-gb.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nipype import Workflow
from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from .. import derivatives as drv
from ..config import AppConfig, PreprocConfig
from ..interfaces.bids import DerivativesDataSink, PublishUnit
from ..interfaces.classify import ClassifyLesions
from ..interfaces.lesions import LesionInstances, PrepareLesionMask
from ..interfaces.n4 import N4BiasCorrection
from ..interfaces.patches import ExtractPatches
from ..interfaces.qsm import PrepareQSM
from ..interfaces.radiomics import RadiomicFeatures
from ..interfaces.registration import ApplyTransform, RegisterFLAIRToQSM
from ..interfaces.reports import ParticipantReport
from .execution import crash_file_of, run_units, run_workflow, scheduler_errors
from .resources import set_memory_estimates

LOGGER = logging.getLogger("qsmrim")


@dataclass(frozen=True)
class ParticipantOutcome:
    unit: drv.Unit
    ok: bool
    message: str = ""


def radiomics_params(pre: PreprocConfig) -> dict:
    """The validated radiomics parameters: read once at start by the command line (cli/run.py); a caller
    that built its configuration itself gets them read here, once per workflow."""
    if pre.radiomics is not None:
        return pre.radiomics
    from ..radiomics import load_params

    return load_params(pre.radiomics_params)


def model_available(config: AppConfig) -> bool:
    return (Path(config.inference.model_dir) / "model.json").is_file()


def init_participant_wf(config: AppConfig, inputs, classify: bool = True) -> Workflow:
    """Build the nipype graph for one participant/session (``inputs``: bids.ParticipantInputs)."""
    unit = drv.Unit(inputs.subject, inputs.session)
    name = unit.prefix.replace("-", "_") + "_wf"
    wf = Workflow(name=name, base_dir=str(config.work_dir))
    out_dir = str(config.output_dir)
    staging = str(drv.staging_root(config.work_dir))
    pre = config.preproc
    bids_dir = Path(config.bids_dir)
    uri = lambda path: drv.bids_uri(path, bids_dir)  # noqa: E731 - one-line adapter

    qsm_ppb = pe.Node(PrepareQSM(in_file=str(inputs.qsm), units=inputs.qsm_units), name="qsm_ppb")
    # One ITK thread, like the registration below: N4 with 2 threads differs from 1 thread (7e-4 on
    # the phantom FLAIR), so results would depend on --nprocs and on how many units share the run.
    n4_kwargs = dict(shrink_factor=pre.n4_shrink_factor, iterations=list(pre.n4_iterations),
                     convergence=pre.n4_convergence, num_threads=1)
    flair_n4 = pe.Node(N4BiasCorrection(in_file=str(inputs.flair), **n4_kwargs), name="flair_n4")
    if not inputs.magnitude:
        LOGGER.warning("%s: no magnitude image in the QSM grid; registering FLAIR %s to a QSM-derived stand-in, "
                       "which is not validated and failed (4.25 mm off) on one of three benchmark cases (docs/performance.md, "
                       "'Registration accuracy'): add "
                       "the GRE magnitude (e.g. *_part-mag_echo-1_MEGRE) and check the report's overlay",
                       unit.prefix, inputs.flair)
    # One thread: ITK's multi-threaded metric sums in a different order each run, so results were
    # not repeatable (lesion voxel counts differed by 1-3 between identical runs with 2 threads).
    register = pe.Node(RegisterFLAIRToQSM(max_metric=pre.registration_max_metric, num_threads=1,
                                          mode=pre.registration, fixed_is_qsm=not inputs.magnitude,
                                          source_moving=str(inputs.flair), source_fixed=str(inputs.magnitude or inputs.qsm)),
                       name="flair_to_qsm_xfm")
    wf.connect([(flair_n4, register, [("out_file", "moving_file")]),
                (qsm_ppb, register, [("mask_file", "fixed_mask_file")])])
    if inputs.magnitude:
        # The magnitude shares the QSM grid and has FLAIR-like anatomy: a better target than the QSM.
        magnitude_n4 = pe.Node(N4BiasCorrection(in_file=str(inputs.magnitude), **n4_kwargs),
                               name="magnitude_n4")
        wf.connect([(qsm_ppb, magnitude_n4, [("mask_file", "mask_file")]),
                    (magnitude_n4, register, [("out_file", "fixed_file")])])
    else:
        wf.connect(qsm_ppb, "out_file", register, "fixed_file")

    flair_in_qsm = pe.Node(ApplyTransform(interpolation="bspline", out_name="flair_in_qsm.nii.gz"),
                           name="flair_in_qsm")
    wf.connect([(flair_n4, flair_in_qsm, [("out_file", "in_file")]),
                (qsm_ppb, flair_in_qsm, [("out_file", "reference_file")]),
                (register, flair_in_qsm, [("transform_file", "transform_file")])])

    # A rater's instance map goes to the QSM grid as drawn; binary masks and probability maps are
    # split (or, with --lesion-split none, thresholded) in their own grid first.
    rater_instances = inputs.lesion_mask_kind == "instances"
    lesions = pe.Node(LesionInstances(source_file=str(inputs.lesion_mask), min_voxels=pre.min_lesion_voxels,
                                      is_instance_map=rater_instances or pre.lesion_split == "auto"),
                      name="lesion_instances")
    mask_source = inputs.lesion_mask
    if not rater_instances:
        split = pe.Node(PrepareLesionMask(mask_file=str(inputs.lesion_mask), source_file=str(inputs.lesion_mask),
                                          kind=inputs.lesion_mask_kind, split=pre.lesion_split,
                                          threshold=pre.lesion_threshold, sigma_mm=pre.split_sigma_mm,
                                          min_centre_mm3=pre.split_min_centre_mm3,
                                          notes=[n for n in inputs.notes if n.startswith("lesion mask")]),
                         name="lesion_split")
        wf.connect([(split, lesions, [("split_file", "split_file"), ("messages", "split_messages")])])
        mask_source = (split, "out_file")
    _into_qsm_grid(wf, "mask", mask_source, inputs.lesion_mask_space, qsm_ppb, register,
                   lesions, "mask_file")
    if inputs.rim_labels:
        _into_qsm_grid(wf, "rim", inputs.rim_labels, inputs.rim_labels_space, qsm_ppb, register,
                       lesions, "rim_file")

    patches = pe.Node(ExtractPatches(extent_mm=tuple(pre.patch_extent_mm), spacing_mm=tuple(pre.patch_spacing_mm)),
                      name="lesion_patches")
    wf.connect([(qsm_ppb, patches, [("out_file", "qsm_file"), ("mask_file", "brain_mask_file")]),
                (flair_in_qsm, patches, [("out_file", "flair_file")]),
                (lesions, patches, [("instances_file", "instances_file")])])
    radiomics = pe.Node(RadiomicFeatures(params=radiomics_params(pre), nprocs=config.omp_nthreads,
                                         source_file=str(inputs.qsm), source_units=inputs.qsm_units),
                        name="lesion_radiomics", n_procs=config.omp_nthreads)
    wf.connect([(qsm_ppb, radiomics, [("out_file", "qsm_file")]),
                (lesions, radiomics, [("instances_file", "instances_file"), ("geometry_file", "geometry_file")]),
                (patches, radiomics, [("radial_file", "extra_features_file")])])

    # Collects the outputs for the sinks. nipype removes IdentityInterface nodes when it flattens the
    # graph, so this is no gate: the sinks only stage, and ``publish`` (a real node) waits for all of them.
    fields = ["flair", "xfm", "dseg", "dseg_tsv", "radiomics", "radiomics_dict", "patches"]
    if inputs.rim_labels:
        fields.append("annotations")
    if classify:
        fields += ["rim_table", "rim_mask", "rim_probseg", "summary"]
    done = pe.Node(IdentityInterface(fields=fields), name="outputs")
    wf.connect([(flair_in_qsm, done, [("out_file", "flair")]),
                (register, done, [("transform_file", "xfm")]),
                (lesions, done, [("instances_file", "dseg"), ("dseg_tsv_file", "dseg_tsv")]),
                (radiomics, done, [("features_file", "radiomics"), ("dictionary_file", "radiomics_dict")]),
                (patches, done, [("patches_file", "patches")])])
    if inputs.rim_labels:
        wf.connect(lesions, "annotations_file", done, "annotations")
    if classify:
        inf = config.inference
        classifier = pe.Node(ClassifyLesions(model_dir=str(inf.model_dir), operating_point=inf.operating_point,
                                             device=config.device, subject=unit.subject,
                                             session=unit.session or ""),
                             name="rim_classification")
        if inf.threshold is not None:
            classifier.inputs.threshold = inf.threshold
        wf.connect([(patches, classifier, [("patches_file", "patches_file")]),
                    (radiomics, classifier, [("features_file", "features_file")]),
                    (lesions, classifier, [("instances_file", "instances_file")]),
                    (classifier, done, [("table_file", "rim_table"), ("mask_file", "rim_mask"),
                                        ("probseg_file", "rim_probseg"), ("summary_file", "summary")])])

    qsm_src, flair_src, mask_src = uri(inputs.qsm), uri(inputs.flair), uri(inputs.lesion_mask)
    sources = {
        "flair": ("flair_preproc", [flair_src, qsm_src], {"SkullStripped": False, "SpatialReference": qsm_src}),
        "xfm": ("xfm_flair_to_qsm", [flair_src, qsm_src], {"Type": "ITK", "Direction":
                "maps QSM-space physical points to FLAIR-space points (ITK resampling convention)"}),
        "dseg": ("lesions_dseg", [mask_src, qsm_src], {"SpatialReference": qsm_src}),
        "dseg_tsv": ("lesions_dseg_tsv", [mask_src], None),  # its sidecar is the image's (same name)
        "radiomics": ("radiomics", [qsm_src, mask_src], {}),
        "patches": ("patches", [qsm_src, flair_src, mask_src],
                    {"Description": "Per-lesion patches resampled in mm along the world (RAS) axes around each lesion's "
                                    "centroid: QSM (ppb), normalised FLAIR, signed distance to the lesion boundary "
                                    "(mm, negative inside), other lesions (1); and each lesion's local reference "
                                    "tissue (median, robust scale; ppb)",
                     "Arrays": {"patches": "float32 (N, 4, X, Y, Z)", "lesion_id": "int32 (N,)",
                                "reference": "float32 (N, 2) median, scale (ppb)", "extent_mm": "float32 (3,)",
                                "spacing_mm": "float32 (3,)", "qsm_voxel_size_mm": "float32 (3,)",
                                "channels": "str (4,)", "format_version": "int32"},
                     "PatchExtentMM": list(pre.patch_extent_mm), "PatchSpacingMM": list(pre.patch_spacing_mm)}),
        "annotations": ("annotations", [uri(inputs.rim_labels)] if inputs.rim_labels else [],
                        drv.ANNOTATION_DICTIONARY),
        "rim_table": ("rim_lesions", [qsm_src, flair_src, mask_src], drv.RIM_DICTIONARY),
        "rim_mask": ("rimplus_mask", [qsm_src, mask_src], {"SpatialReference": qsm_src}),
        "rim_probseg": ("rimplus_probseg", [qsm_src, mask_src], {"SpatialReference": qsm_src}),
        "summary": ("summary", [qsm_src, flair_src, mask_src], drv.SUMMARY_DICTIONARY),
    }
    sinks = {}
    for field in fields:
        if field == "radiomics_dict":
            continue
        role, srcs, meta = sources[field]
        sink = pe.Node(DerivativesDataSink(base_directory=staging, subject=unit.subject,
                                           session=unit.session or "", role=role, sources=srcs,
                                           metadata=meta or {}, write_sidecar=meta is not None),
                       name=f"ds_{role}", run_without_submitting=True)
        wf.connect(done, field, sink, "in_file")
        sinks[field] = sink
    wf.connect(done, "radiomics_dict", sinks["radiomics"], "metadata_file")
    wf.connect(register, "sidecar_file", sinks["xfm"], "metadata_file")  # mode and each stage's metric

    gather = pe.Node(Merge(len(sinks)), name="written")
    for index, sink in enumerate(sinks.values(), start=1):
        wf.connect(sink, "out_file", gather, f"in{index}")
    publish = pe.Node(PublishUnit(staging_directory=staging, base_directory=out_dir, subject=unit.subject,
                                  session=unit.session or ""), name="publish", run_without_submitting=True)
    wf.connect(gather, "out", publish, "staged_files")
    if classify:
        report = pe.Node(ParticipantReport(
            base_directory=staging, subject=unit.subject, session=unit.session or "",
            qsm_file=str(inputs.qsm), qsm_units=inputs.qsm_units,
            inputs_found={k: str(v) for k, v in _inputs_found(inputs).items()}),
            name="participant_report", run_without_submitting=True)
        wf.connect([(gather, report, [("out", "derivative_files")]),
                    (register, report, [("report_file", "registration_file")]),
                    (qsm_ppb, report, [("warnings", "qsm_messages")]),
                    (lesions, report, [("messages", "lesion_messages")]),
                    (patches, report, [("messages", "patch_messages")]),
                    (report, publish, [("out_file", "report_file")])])
    set_memory_estimates(wf)
    return wf


def _into_qsm_grid(wf: Workflow, what: str, source, space: str, qsm_ppb, register, target, field: str) -> None:
    """Masks drawn on the FLAIR are resampled (nearest neighbour keeps instance labels).

    ``source`` is an input file or a ``(node, output)`` pair of this workflow.
    """
    if space == "QSM":
        if isinstance(source, tuple):
            wf.connect(source[0], source[1], target, field)
        else:
            setattr(target.inputs, field, str(source))
        return
    resample = pe.Node(ApplyTransform(interpolation="nearest", out_name=f"{what}_in_qsm.nii.gz"),
                       name=f"{what}_in_qsm")
    if isinstance(source, tuple):
        wf.connect(source[0], source[1], resample, "in_file")
    else:
        resample.inputs.in_file = str(source)
    wf.connect([(qsm_ppb, resample, [("out_file", "reference_file")]),
                (register, resample, [("transform_file", "transform_file")]),
                (resample, target, [("out_file", field)])])


def _inputs_found(inputs) -> dict:
    found = {"QSM": inputs.qsm, "FLAIR": inputs.flair, "Lesion mask": inputs.lesion_mask}
    if inputs.magnitude:
        found["Magnitude"] = inputs.magnitude
    if inputs.rim_labels:
        found["Rim annotations"] = inputs.rim_labels
    return found


def run_participants(config: AppConfig, inputs: Sequence, problems: Sequence = ()) -> int:
    """Run every unit; a failed unit is reported and skipped, the others complete. Exit code 0/1.

    Each unit's ``logs/`` record says how it ended (``done`` / ``failed`` with the reason and the crash
    file); ``problems`` (units refused for their inputs) are recorded by the caller.
    """
    drv.init_output_dir(config.output_dir, config.bids_dir, config.container)
    classify = config.classify
    if classify and not model_available(config):
        LOGGER.error("no model (model.json) in %s: pass --model with a directory written by "
                     "`group --train`, or --no-classify to run the preprocessing only", config.inference.model_dir)
        return 1
    drv.staging_root(config.work_dir).mkdir(parents=True, exist_ok=True)
    units = {drv.Unit(i.subject, i.session).prefix: i for i in inputs}
    logs = {label: drv.write_run_log(config.output_dir, "participant", config.command_line, drv.config_record(config),
                                     label=label) for label in units}
    errors: dict[str, str] = {}
    built = {}
    for label, unit_inputs in units.items():
        try:
            built[label] = init_participant_wf(config, unit_inputs, classify=classify)
        except Exception as exc:  # a unit whose graph cannot be built fails alone
            errors[label] = str(exc)

    def finished(label: str, error: str | None = None) -> None:
        final = drv.output_path(config.output_dir, drv.Unit(units[label].subject, units[label].session),
                                "summary" if classify else "radiomics")
        if error is None and not final.is_file():
            error = f"the workflow ended without writing {final.name}"
        drv.finish_run_log(logs[label], "failed" if error else "done", error, crash_file_of(error))
        if error:
            errors[label] = error
            LOGGER.error("%s: FAILED: %s", label, error)
        else:
            LOGGER.info("%s: done", label)

    if config.plugin == "MultiProc" and built:
        done_early: set[str] = set()

        def on_done(label: str) -> None:  # logged (and its run log closed) the moment it is published
            done_early.add(label)
            finished(label)

        for label, error in run_units(config, built, on_done=on_done).items():
            if label not in done_early:
                finished(label, error)
    else:
        for label, wf in built.items():  # schedulers (SLURM, ...) get one unit's graph at a time
            try:
                run_workflow(wf, config, label)
                error = None
                if not drv.output_path(config.output_dir, drv.Unit(units[label].subject, units[label].session),
                                       "summary" if classify else "radiomics").is_file() and scheduler_errors(wf):
                    error = f"the workflow ended without its final output ({scheduler_errors(wf)})"
            except Exception as exc:  # one participant's failure must not stop the others
                error = str(exc)
            finished(label, error)
    for label in set(units) - set(built):
        drv.finish_run_log(logs[label], "failed", errors[label])
        LOGGER.error("%s: FAILED: %s", label, errors[label])
    # The units refused for their inputs (``problems``) have their own records and exit code (cli/run.py);
    # the run's closing summary of every unit is written there too.
    return 1 if errors else 0
