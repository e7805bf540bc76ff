"""The participant level: one nipype workflow per participant/session, all units in one graph.

N4 -> register FLAIR to QSM -> resample -> lesion instances -> patches + radiomics -> classify -> sink
-> publish. Every step is a cached nipype node in the work directory, so an interrupted run resumes
where it stopped. The sinks write into the work dir's staging tree; the unit's last node publishes the
complete set into the output dir, so a failed unit leaves nothing there (and keeps what an earlier
complete run published). With MultiProc, every unit runs in one graph under --nprocs / --mem-gb.

One sub-workflow per stage, each with an inputnode and an outputnode (fMRIPrep's shape):
registration_wf -> lesions_wf -> features_wf -> classification_wf -> outputs_wf.
"""
from __future__ import annotations

import logging
from functools import partial
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


def radiomics_params(pre: PreprocConfig) -> dict:
    """The validated radiomics parameters: read once at start by the command line (cli/run.py); a caller
    that built its configuration itself gets them read here, once per workflow."""
    if pre.radiomics is not None:
        return pre.radiomics
    from ..radiomics import load_params

    return load_params(pre.radiomics_params)


def model_available(config: AppConfig) -> bool:
    return (Path(config.inference.model_dir) / "model.json").is_file()


def _final_role(classify: bool) -> str:
    """The output a complete unit has written last (the one final-output check reads it)."""
    return "summary" if classify else "radiomics"


def init_participant_wf(config: AppConfig, inputs, classify: bool = True) -> Workflow:
    """Build the nipype graph for one participant/session (``inputs``: bids.ParticipantInputs).

    Like fMRIPrep's ``init_single_subject_wf``, it hands the work to one sub-workflow per stage
    (registration, lesions, features, classification, outputs), each with an inputnode and an outputnode.
    """
    unit = drv.Unit(inputs.subject, inputs.session)
    wf = Workflow(name=unit.prefix.replace("-", "_") + "_wf", base_dir=str(config.work_dir))
    registration = init_registration_wf(config.preproc, inputs, unit)
    lesions = init_lesions_wf(config.preproc, inputs)
    features = init_features_wf(config, inputs)
    outputs = init_outputs_wf(config, inputs, classify)
    wf.connect([
        (registration, lesions, [("outputnode.qsm", "inputnode.qsm"), ("outputnode.transform", "inputnode.transform")]),
        (registration, features, [("outputnode.qsm", "inputnode.qsm"), ("outputnode.brain_mask", "inputnode.brain_mask"),
                                  ("outputnode.flair", "inputnode.flair")]),
        (lesions, features, [("outputnode.instances", "inputnode.instances"),
                             ("outputnode.geometry", "inputnode.geometry")]),
        (registration, outputs, [("outputnode.flair", "inputnode.flair"), ("outputnode.transform", "inputnode.xfm"),
                                 ("outputnode.transform_sidecar", "inputnode.xfm_sidecar"),
                                 ("outputnode.report", "inputnode.registration_report"),
                                 ("outputnode.qsm_warnings", "inputnode.qsm_messages")]),
        (lesions, outputs, [("outputnode.instances", "inputnode.dseg"), ("outputnode.dseg_tsv", "inputnode.dseg_tsv"),
                            ("outputnode.messages", "inputnode.lesion_messages")]),
        (features, outputs, [("outputnode.radiomics", "inputnode.radiomics"),
                             ("outputnode.radiomics_dict", "inputnode.radiomics_dict"),
                             ("outputnode.patches", "inputnode.patches"),
                             ("outputnode.messages", "inputnode.patch_messages")]),
    ])
    if inputs.rim_labels:
        wf.connect(lesions, "outputnode.annotations", outputs, "inputnode.annotations")
    if classify:
        classification = init_classification_wf(config, unit)
        wf.connect([
            (features, classification, [("outputnode.patches", "inputnode.patches"),
                                        ("outputnode.radiomics", "inputnode.features")]),
            (lesions, classification, [("outputnode.instances", "inputnode.instances")]),
            (classification, outputs, [(f"outputnode.{f}", f"inputnode.{f}") for f in CLASSIFICATION_FIELDS]),
        ])
    set_memory_estimates(wf)
    return wf


def init_registration_wf(pre: PreprocConfig, inputs, unit: drv.Unit, name: str = "registration_wf") -> Workflow:
    """QSM in ppb (and its brain mask), the FLAIR (and magnitude) bias-corrected, the FLAIR registered to
    the QSM grid and resampled into it. Outputs: qsm, brain_mask, qsm_warnings, flair, transform (+ its
    sidecar and the registration report)."""
    wf = Workflow(name=name)
    outputnode = pe.Node(IdentityInterface(fields=["qsm", "brain_mask", "qsm_warnings", "flair", "transform",
                                                   "transform_sidecar", "report"]), name="outputnode")
    qsm_ppb = pe.Node(PrepareQSM(in_file=str(inputs.qsm), units=inputs.qsm_units), name="qsm_ppb")
    # One ITK thread, like the registration below: N4 with 2 threads differs from 1 thread (7e-4 on
    # the phantom FLAIR), so results would depend on --nprocs and on how many units share the run.
    n4_kwargs = dict(shrink_factor=pre.n4_shrink_factor, iterations=list(pre.n4_iterations),
                     convergence=pre.n4_convergence, num_threads=1)
    flair_n4 = pe.Node(N4BiasCorrection(in_file=str(inputs.flair), **n4_kwargs), name="flair_n4")
    if not inputs.magnitude:
        LOGGER.warning("%s: no magnitude image in the QSM grid; registering FLAIR %s by its brain outline, then to "
                       "a QSM-derived stand-in (validated on one-head phantoms only, docs/registration.md): the "
                       "registration gate checks it; the GRE magnitude (e.g. *_part-mag_echo-1_MEGRE) is better",
                       unit.prefix, inputs.flair)
    # One thread: ITK's multi-threaded metric sums in a different order each run, so results were
    # not repeatable (lesion voxel counts differed by 1-3 between identical runs with 2 threads).
    register = pe.Node(RegisterFLAIRToQSM(max_metric=pre.registration_max_metric, num_threads=1,
                                          mode=pre.registration, fixed_is_qsm=not inputs.magnitude,
                                          gate_threshold_mm=pre.registration_gate_mm,
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
                (register, flair_in_qsm, [("transform_file", "transform_file")]),
                (qsm_ppb, outputnode, [("out_file", "qsm"), ("mask_file", "brain_mask"), ("warnings", "qsm_warnings")]),
                (flair_in_qsm, outputnode, [("out_file", "flair")]),
                (register, outputnode, [("transform_file", "transform"), ("sidecar_file", "transform_sidecar"),
                                        ("report_file", "report")])])
    return wf


def init_lesions_wf(pre: PreprocConfig, inputs, name: str = "lesions_wf") -> Workflow:
    """Lesion instances in the QSM grid (and the expert rim labels carried onto them).

    A rater's instance map goes to the QSM grid as drawn; binary masks and probability maps are split
    (or, with --lesion-split none, thresholded) in their own grid first. Inputs: qsm (the grid),
    transform (FLAIR to QSM). Outputs: instances, geometry, dseg_tsv, annotations, messages.
    """
    wf = Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["qsm", "transform"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["instances", "geometry", "dseg_tsv", "annotations", "messages"]),
                         name="outputnode")
    lesions = pe.Node(LesionInstances(source_file=str(inputs.lesion_mask), min_voxels=pre.min_lesion_voxels),
                      name="lesion_instances")
    mask_source = inputs.lesion_mask
    if inputs.lesion_mask_kind == "instances":
        lesions.inputs.is_instance_map = True
    else:
        split = pe.Node(PrepareLesionMask(mask_file=str(inputs.lesion_mask), source_file=str(inputs.lesion_mask),
                                          kind=inputs.lesion_mask_kind, split=pre.lesion_split,
                                          threshold=pre.lesion_threshold, sigma_mm=pre.split_sigma_mm,
                                          min_centre_mm3=pre.split_min_centre_mm3,
                                          notes=[n for n in inputs.notes if n.startswith("lesion mask")]),
                         name="lesion_split")
        wf.connect([(split, lesions, [("split_file", "split_file"), ("messages", "split_messages"),
                                      ("is_instance_map", "is_instance_map")])])
        mask_source = (split, "out_file")
    _into_qsm_grid(wf, "mask", mask_source, inputs.lesion_mask_space, inputnode, lesions, "mask_file")
    if inputs.rim_labels:
        _into_qsm_grid(wf, "rim", inputs.rim_labels, inputs.rim_labels_space, inputnode, lesions, "rim_file")
        wf.connect(lesions, "annotations_file", outputnode, "annotations")
    wf.connect(lesions, "instances_file", outputnode, "instances")
    wf.connect([(lesions, outputnode, [("geometry_file", "geometry"), ("dseg_tsv_file", "dseg_tsv"),
                                       ("messages", "messages")])])
    return wf


def _into_qsm_grid(wf: Workflow, what: str, source, space: str, inputnode, target, field: str) -> None:
    """Masks drawn on the FLAIR are resampled (nearest neighbour keeps instance labels).

    ``source`` is an input file or a ``(node, output)`` pair of this workflow; ``inputnode`` provides the
    QSM grid (``qsm``) and the FLAIR-to-QSM ``transform``.
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
    wf.connect([(inputnode, resample, [("qsm", "reference_file"), ("transform", "transform_file")]),
                (resample, target, [("out_file", field)])])


def init_features_wf(config: AppConfig, inputs, name: str = "features_wf") -> Workflow:
    """Each lesion's patches (in mm) and its 527 radiomic + radial-profile features. Inputs: qsm,
    brain_mask, flair (in the QSM grid), instances, geometry. Outputs: patches, radiomics, radiomics_dict,
    messages."""
    pre = config.preproc
    wf = Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["qsm", "brain_mask", "flair", "instances", "geometry"]),
                        name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["patches", "radiomics", "radiomics_dict", "messages"]),
                         name="outputnode")
    patches = pe.Node(ExtractPatches(extent_mm=tuple(pre.patch_extent_mm), spacing_mm=tuple(pre.patch_spacing_mm)),
                      name="lesion_patches")
    radiomics = pe.Node(RadiomicFeatures(params=radiomics_params(pre), nprocs=config.omp_nthreads,
                                         source_file=str(inputs.qsm), source_units=inputs.qsm_units),
                        name="lesion_radiomics", n_procs=config.omp_nthreads)
    wf.connect([(inputnode, patches, [("qsm", "qsm_file"), ("brain_mask", "brain_mask_file"), ("flair", "flair_file"),
                                      ("instances", "instances_file")]),
                (inputnode, radiomics, [("qsm", "qsm_file"), ("instances", "instances_file"),
                                        ("geometry", "geometry_file")]),
                (patches, radiomics, [("radial_file", "extra_features_file")]),
                (patches, outputnode, [("patches_file", "patches"), ("messages", "messages")]),
                (radiomics, outputnode, [("features_file", "radiomics"), ("dictionary_file", "radiomics_dict")])])
    return wf


CLASSIFICATION_FIELDS = ["rim_table", "rim_mask", "rim_probseg", "summary"]


def init_classification_wf(config: AppConfig, unit: drv.Unit, name: str = "classification_wf") -> Workflow:
    """The model's rim+ call for every lesion. Inputs: patches, features, instances. Outputs: rim_table,
    rim_mask, rim_probseg, summary."""
    inf = config.inference
    wf = Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["patches", "features", "instances"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=CLASSIFICATION_FIELDS), name="outputnode")
    classifier = pe.Node(ClassifyLesions(model_dir=str(inf.model_dir), operating_point=inf.operating_point,
                                         device=config.device, subject=unit.subject, session=unit.session or ""),
                         name="rim_classification")
    if inf.threshold is not None:
        classifier.inputs.threshold = inf.threshold
    wf.connect([(inputnode, classifier, [("patches", "patches_file"), ("features", "features_file"),
                                         ("instances", "instances_file")]),
                (classifier, outputnode, [("table_file", "rim_table"), ("mask_file", "rim_mask"),
                                          ("probseg_file", "rim_probseg"), ("summary_file", "summary")])])
    return wf


def init_outputs_wf(config: AppConfig, inputs, classify: bool, name: str = "outputs_wf") -> Workflow:
    """Stage every output with its sidecar (derivatives.participant_outputs), write the report, then
    publish the complete set into the output dir in one step (all or nothing per unit)."""
    unit = drv.Unit(inputs.subject, inputs.session)
    staging = str(drv.staging_root(config.work_dir))
    fields = ["flair", "xfm", "dseg", "dseg_tsv", "radiomics", "patches"]
    if inputs.rim_labels:
        fields.append("annotations")
    if classify:
        fields += CLASSIFICATION_FIELDS
    wf = Workflow(name=name)
    # nipype removes IdentityInterface nodes when it flattens the graph, so this is no gate: the sinks
    # only stage, and ``publish`` (a real node) waits for all of them.
    inputnode = pe.Node(IdentityInterface(fields=[*fields, "radiomics_dict", "xfm_sidecar", "registration_report",
                                                  "qsm_messages", "lesion_messages", "patch_messages"]),
                        name="inputnode")
    uri = partial(drv.bids_uri, bids_dir=Path(config.bids_dir))
    outputs = drv.participant_outputs(uri(inputs.qsm), uri(inputs.flair), uri(inputs.lesion_mask),
                                      uri(inputs.rim_labels) if inputs.rim_labels else None,
                                      config.preproc.patch_extent_mm, config.preproc.patch_spacing_mm)
    sinks = {}
    for field in fields:
        role, srcs, meta = outputs[field]
        sinks[field] = pe.Node(DerivativesDataSink(base_directory=staging, subject=unit.subject,
                                                   session=unit.session or "", role=role, sources=srcs,
                                                   metadata=meta or {}, write_sidecar=meta is not None),
                               name=f"ds_{role}", run_without_submitting=True)
        wf.connect(inputnode, field, sinks[field], "in_file")
    wf.connect(inputnode, "radiomics_dict", sinks["radiomics"], "metadata_file")
    wf.connect(inputnode, "xfm_sidecar", sinks["xfm"], "metadata_file")  # mode and each stage's metric
    gather = pe.Node(Merge(len(sinks)), name="written")
    for index, sink in enumerate(sinks.values(), start=1):
        wf.connect(sink, "out_file", gather, f"in{index}")
    publish = pe.Node(PublishUnit(staging_directory=staging, base_directory=str(config.output_dir),
                                  subject=unit.subject, session=unit.session or ""),
                      name="publish", run_without_submitting=True)
    wf.connect(gather, "out", publish, "staged_files")
    if classify:
        report = pe.Node(ParticipantReport(
            base_directory=staging, subject=unit.subject, session=unit.session or "",
            qsm_file=str(inputs.qsm), qsm_units=inputs.qsm_units,
            inputs_found={k: str(v) for k, v in _inputs_found(inputs).items()}),
            name="participant_report", run_without_submitting=True)
        wf.connect([(gather, report, [("out", "derivative_files")]),
                    (inputnode, report, [("registration_report", "registration_file"),
                                         ("qsm_messages", "qsm_messages"), ("lesion_messages", "lesion_messages"),
                                         ("patch_messages", "patch_messages")]),
                    (report, publish, [("out_file", "report_file")])])
    return wf


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
    gate_failed: list[str] = []
    built = {}
    for label, unit_inputs in units.items():
        try:
            built[label] = init_participant_wf(config, unit_inputs, classify=classify)
        except Exception as exc:  # a unit whose graph cannot be built fails alone
            errors[label] = str(exc)

    def finished(label: str, error: str | None = None, wf: Workflow | None = None) -> None:
        """The one place a unit ends: its final output checked, its run log closed (with the registration
        gate's verdict), done, gate failure or FAILED logged."""
        if error is None:
            error = _missing_final_output(config, units[label], classify, wf)
        gate = None if error else registration_gate_record(config.output_dir, units[label])
        drv.finish_run_log(logs[label], "failed" if error else "done", error, crash_file_of(error),
                           extra={"registration_gate": gate} if gate else None)
        if error:
            errors[label] = error
            LOGGER.error("%s: FAILED: %s", label, error)
        elif gate and gate["verdict"] == "fail":
            gate_failed.append(label)
            LOGGER.error("%s: registration gate FAILED: the FLAIR disagrees with the brain outlines by %.2f mm "
                         "(threshold %.2f mm); outputs written for review (check the report's registration "
                         "overlay), its counts are left out of the group analysis unless "
                         "--keep-failed-registration", label, gate["value_mm"], gate["threshold_mm"])
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
            except Exception as exc:  # one participant's failure must not stop the others
                error = str(exc)
            finished(label, error, wf)
    for label in set(units) - set(built):
        finished(label, errors[label])
    # The units refused for their inputs (``problems``) have their own records and exit code (cli/run.py);
    # the run's closing summary of every unit is written there too.
    if gate_failed:
        LOGGER.error("%d of %d participant units failed the registration gate: %s", len(gate_failed),
                     len(units) + len(problems), ", ".join(sorted(gate_failed)))
    return 1 if errors or gate_failed else 0


def registration_gate_record(output_dir: Path, inputs) -> dict | None:
    """The registration gate's verdict of a published unit, from its transform's sidecar (None: not recorded)."""
    sidecar = drv.sidecar_path(drv.output_path(output_dir, drv.Unit(inputs.subject, inputs.session),
                                               "xfm_flair_to_qsm"))
    return drv.registration_gate(sidecar)


def _missing_final_output(config: AppConfig, inputs, classify: bool, wf: Workflow | None = None) -> str | None:
    """None when the unit's final output is in the output dir; else why not (a batch scheduler's own
    error files, when ``wf`` ran through one and left some)."""
    final = drv.output_path(config.output_dir, drv.Unit(inputs.subject, inputs.session), _final_role(classify))
    if final.is_file():
        return None
    detail = scheduler_errors(wf) if wf is not None else ""
    if detail:
        return f"the workflow ended without its final output ({detail})"
    return f"the workflow ended without writing {final.name}"
