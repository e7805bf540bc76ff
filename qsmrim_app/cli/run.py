"""``qsmrim`` / ``run.py``: validate the command line, build the one AppConfig, dispatch, exit codes.

Exit codes (``exitcodes.EXIT_CODES``, also in ``--help``) follow the BIDS Apps execution spec: 0 success,
1 a participant/session failed (the others still complete), 16 BIDS validation failed, 18 the selection
matched no data, 64 usage error, 66 input missing (a path, or a selected unit's QSM, FLAIR or lesion mask).
Every refusal is one log line naming the path or label and the fix.
"""
from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..config import AppConfig, InferenceConfig, PreprocConfig
from ..model.config import protocol_config
from ..patches import DEFAULT_EXTENT_MM, DEFAULT_SPACING_MM, PatchGrid
from ..model.methods import ALL_METHODS, NETWORK_METHODS, starts_from_model
from .common import container_name
from .exitcodes import (EXIT_BIDS_INVALID, EXIT_INPUT_MISSING, EXIT_INTERRUPTED, EXIT_NO_DATA, EXIT_OK,
                        EXIT_PARTICIPANT_FAILED, EXIT_USAGE)
from .parser import build_parser

LOGGER = logging.getLogger("qsmrim")


class UsageError(Exception):
    """A refusal of the command line as given: message for the user plus the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def setup_logging(verbosity: int) -> None:
    """One handler on stderr; -v/-vv raise our verbosity and then nipype's."""
    level = logging.INFO if verbosity < 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    # nipype and pybids are noisy; keep them to warnings unless asked for more.
    third_party = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bids"):
        logging.getLogger(name).setLevel(third_party)


def configure_nipype(verbosity: int) -> None:
    """nipype resets its loggers from its own config on import: set the levels there too."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = {0: "WARNING", 1: "INFO"}.get(verbosity, "DEBUG")
    for key in ("interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    # The workflow logger stays at INFO so progress is visible; at default verbosity a filter
    # lets through only one line per finished node (plus warnings and errors).
    nipype_config.set("logging", "workflow_level", "INFO" if verbosity < 2 else "DEBUG")
    nipype_config.set("execution", "check_version", "false")  # no network call home
    nipype_logging.update_logging(nipype_config)
    workflow_logger = logging.getLogger("nipype.workflow")
    workflow_logger.filters[:] = []
    if verbosity < 1:
        workflow_logger.addFilter(_finished_nodes_only)


#: nipype's own error lines about a failed node; our one line per unit (with the crash file) says it.
_NIPYPE_CRASH_NOISE = ("Saving crash info to", "could not run node:", "***", "[Node] Error on",
                       "Storing result file without outputs")


def _finished_nodes_only(record: logging.LogRecord) -> bool:
    """Default progress: '[Node] Finished "x", elapsed time Ns.' and warnings, without nipype's crash dumps."""
    message = record.getMessage()
    if record.levelno >= logging.WARNING and (message.startswith(_NIPYPE_CRASH_NOISE) or
                                              (message.startswith("Node ") and "failed to run" in message)):
        return False
    return record.levelno > logging.INFO or message.startswith("[Node] Finished")


def _is_within(path: Path, parent: Path) -> bool:
    """True when ``path`` is ``parent`` or below it (both already resolved)."""
    return path == parent or parent in path.parents


def _resolve_paths(args: Namespace) -> tuple[Path, Path, Path]:
    """Absolute bids/output/work dirs, refusing layouts that would write into the input dataset."""
    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise UsageError(f"BIDS dataset {args.bids_dir} does not exist; give the folder that holds "
                         "dataset_description.json and the sub-* folders", EXIT_INPUT_MISSING)
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS dataset {args.bids_dir} is not a folder", EXIT_INPUT_MISSING)

    output_dir = args.output_dir.expanduser().resolve()
    derivatives_root = bids_dir / "derivatives"
    if _is_within(output_dir, bids_dir) and not (
        output_dir != derivatives_root and _is_within(output_dir, derivatives_root)
    ):
        raise UsageError(f"output_dir {output_dir} is inside the input dataset {bids_dir}; use a folder "
                         f"outside it or {derivatives_root}/qsmrim")
    if _is_within(bids_dir, output_dir):
        raise UsageError(f"output_dir {output_dir} contains the input dataset {bids_dir}; "
                         "choose a folder beside it, e.g. <dataset>/../derivatives/qsmrim")

    if args.work_dir is not None:
        work_dir = args.work_dir.expanduser().resolve()
    elif _is_within(output_dir, bids_dir):
        work_dir = bids_dir.parent / "qsmrim_work"
    else:
        work_dir = output_dir.parent / "qsmrim_work"
    if _is_within(work_dir, bids_dir):
        raise UsageError(f"work directory {work_dir} is inside the input dataset {bids_dir}; "
                         "give -w/--work-dir a folder outside it")
    if _is_within(bids_dir, work_dir):
        raise UsageError(f"work directory {work_dir} contains the input dataset {bids_dir}; "
                         "give -w/--work-dir a folder of its own")
    return bids_dir, output_dir, work_dir


def _patch_grid(args: Namespace, model_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The patch extent and spacing (mm): as given, else the model's (model.json), else the defaults."""
    from ..model.modeldir import ModelDirError, read_model_json

    try:
        stored = read_model_json(model_dir).get("inputs") or {}
    except ModelDirError:  # no model (e.g. --no-classify) or an unreadable one, reported where it is used
        stored = {}
    extent = args.patch_extent_mm or stored.get("extent_mm") or DEFAULT_EXTENT_MM
    spacing = args.patch_spacing_mm or stored.get("spacing_mm") or DEFAULT_SPACING_MM
    return tuple(float(v) for v in extent), tuple(float(v) for v in spacing)


def build_config(args: Namespace, argv: Sequence[str]) -> AppConfig:
    """The one AppConfig from parsed arguments (paths validated, defaults resolved)."""
    if args.cv_group_by and not (args.train and args.analysis_level == "group"):
        raise UsageError("--cv-group-by only applies to `group --train`")
    bids_dir, output_dir, work_dir = _resolve_paths(args)
    if args.analysis_level == "group" and not output_dir.is_dir():
        raise UsageError(f"output_dir {output_dir} does not exist; run the participant level first "
                         "(same bids_dir and output_dir, analysis level 'participant')", EXIT_INPUT_MISSING)
    plugin = args.use_plugin or {"plugin": "MultiProc", "plugin_args": {}}
    plugin_args = dict(plugin["plugin_args"])
    if plugin["plugin"] == "MultiProc":
        plugin_args.setdefault("n_procs", args.nprocs)
        if args.mem_gb is not None:
            plugin_args.setdefault("memory_gb", args.mem_gb)
    omp_nthreads = args.omp_nthreads or min(8, args.nprocs)
    methods = ALL_METHODS if args.method == "all" else (args.method or _default_method(args),)
    model_dir = args.model.resolve() if args.model is not None else InferenceConfig().model_dir
    extent, spacing = _patch_grid(args, model_dir)
    preproc = PreprocConfig(
        n4_shrink_factor=args.n4_shrink_factor,
        n4_iterations=tuple(args.n4_iterations),
        min_lesion_voxels=args.min_lesion_voxels,
        patch_extent_mm=extent,
        patch_spacing_mm=spacing,
        lesion_split=args.lesion_split,
        lesion_threshold=args.lesion_threshold,
        qsm_units=args.qsm_units,
        registration=args.registration,
        registration_gate_mm=args.registration_gate_mm,
    )
    inference = InferenceConfig(threshold=args.threshold, operating_point=args.operating_point)
    if args.model is not None:
        inference = InferenceConfig(model_dir=args.model.resolve(), threshold=args.threshold,
                                    operating_point=args.operating_point)
    init_model = _init_model(args, methods)
    try:
        explicit = dict(method=methods[0], epochs=args.epochs, max_steps=args.max_steps,
                        batch_size=args.batch_size, folds=args.folds, seeds=args.seeds,
                        width_multiplier=args.width_multiplier, weights_fp16=args.weights_fp16 or None,
                        input_level=args.inputs, feature_set=args.feature_set, patch_extent_mm=extent,
                        patch_spacing_mm=spacing, device=args.device, init_model=init_model)
        inherited = _init_architecture(init_model)
        # protocol_config drops None values, so an option left unset keeps the inherited architecture.
        training = protocol_config(args.protocol, **{**inherited, **{k: v for k, v in explicit.items() if v is not None}})
        PatchGrid(extent, spacing)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return AppConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_labels=tuple(dict.fromkeys(args.participant_label)),
        session_labels=tuple(dict.fromkeys(args.session_label)),
        bids_filters=args.bids_filters or {},
        derivatives=tuple(dict.fromkeys(p.resolve() for p in args.derivatives)),
        rim_annotations=_rim_annotations(args, output_dir),
        nprocs=args.nprocs,
        omp_nthreads=omp_nthreads,
        omp_nthreads_given=args.omp_nthreads is not None,
        container=container_name(),
        mem_gb=args.mem_gb,
        device=args.device,
        plugin=plugin["plugin"],
        plugin_args=plugin_args,
        skip_bids_validation=args.skip_bids_validation,
        verbosity=args.verbose,
        train=args.train,
        recalibrate=_recalibrate(args),
        classify=not args.no_classify,
        keep_failed_registration=args.keep_failed_registration,
        train_methods=tuple(methods),
        cv_group_by=args.cv_group_by,
        preproc=preproc,
        inference=inference,
        training=training,
        command_line=tuple(argv),
    )


def _rim_annotations(args: Namespace, output_dir: Path) -> Path | None:
    """--rim-annotations: a dataset folder of its own (a qsmrim-review folder, say), not our output."""
    if args.rim_annotations is None:
        return None
    path = args.rim_annotations.resolve()
    if not path.is_dir():
        raise UsageError(f"--rim-annotations {path} is not a folder; give the dataset that holds the "
                         "*_desc-rim_dseg images (e.g. the qsmrim-review folder)", EXIT_INPUT_MISSING)
    if _is_within(path, output_dir) or _is_within(output_dir, path):
        raise UsageError(f"--rim-annotations {path} overlaps output_dir {output_dir}; the annotations are "
                         "a dataset of their own")
    return path


def _recalibrate(args: Namespace) -> bool:
    """--recalibrate: group level, with the review folder, not with --train."""
    if args.recalibrate and (args.analysis_level != "group" or args.train or args.rim_annotations is None):
        raise UsageError("--recalibrate is a group-level option without --train and needs --rim-annotations "
                         "REVIEW_DIR (the qsmrim-review folder with the rater's decisions)")
    return bool(args.recalibrate)


def _init_model(args: Namespace, methods: Sequence[str]) -> str | None:
    """--init-model: only with --train and one network method, and only a model directory."""
    if args.init_model is None:
        return None
    if not args.train:
        raise UsageError("--init-model only applies to `group --train`")
    if len(methods) > 1:
        raise UsageError("--init-model fine-tunes one network; --method all also trains comparators that "
                         "cannot start from it: choose one --method")
    if not starts_from_model(methods[0]):
        raise UsageError(f"--init-model starts networks from a model's members; --method {methods[0]} is not "
                         f"a network (use one of {', '.join(NETWORK_METHODS)}, or fusion)")
    path = args.init_model.resolve()
    if not (path / "model.json").is_file():
        raise UsageError(f"--init-model {path} holds no model.json; give a directory written by "
                         "`group --train` (or the bundled model)", EXIT_INPUT_MISSING)
    init_method = _stored_method(path)
    if (init_method == "fusion") != (methods[0] == "fusion"):
        raise UsageError(f"--init-model {path} is a {init_method} model and --method is {methods[0]}: a fusion "
                         "fine-tunes from a fusion (each network from its namesake component), a network from "
                         "a network; leave --method out to fine-tune the model's own method")
    return str(path)


def _stored_method(model_dir: Path) -> str | None:
    """The method a model directory says it is (None when its model.json cannot be read)."""
    from ..model.modeldir import ModelDirError, read_model_json

    try:
        return str(read_model_json(model_dir).get("method"))
    except ModelDirError:
        return None


def _default_method(args: Namespace) -> str:
    """--method left out: the --init-model's own method when it can start one (fine-tuning the bundled
    fusion model fine-tunes a fusion), else QSMRim-Net (check_init_model then says what is wrong)."""
    from ..model.methods import METHODS

    if args.init_model is not None and (args.init_model / "model.json").is_file():
        method = _stored_method(args.init_model)
        if method in METHODS and starts_from_model(method):
            return method
    return "qsmrimnet"


def _init_architecture(init_model: str | None) -> dict:
    """A fine-tuning run builds the starting model's network (width, stem, wide term, fusion) and reads its
    feature set unless the command line says otherwise (an explicit --width-multiplier wins and is then
    checked against it)."""
    from ..model.config import TrainConfig
    from ..model.finetune import ARCHITECTURE_KEYS, read_init_model

    if init_model is None:
        return {}
    stored = TrainConfig.from_dict(read_init_model(Path(init_model)).get("config") or {})
    return {key: getattr(stored, key) for key in (*ARCHITECTURE_KEYS, "feature_set")}


def _validate_dataset(config: AppConfig) -> None:
    """BIDS validation of the raw dataset (unless skipped): exit 16 naming the offending paths."""
    from ..bids import validate_dataset

    if config.skip_bids_validation:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
        return
    errors = validate_dataset(config.bids_dir)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise UsageError(f"{config.bids_dir} is not a valid BIDS dataset:\n  {shown}{more}\n"
                         "Fix or .bidsignore these files, or pass --skip-bids-validation",
                         EXIT_BIDS_INVALID)


def run_participant_level(config: AppConfig) -> int:
    """Discover every participant/session, report problems, hand the good ones to the workflow.

    Every selected unit ends with a ``logs/`` record (done, failed or skipped, with its reason) and a
    line in the closing summary; the exit code says the worst that happened (see ``_participant_exit``).
    """
    from ..bids import SelectionError, discover

    since = datetime.now(timezone.utc)
    try:
        inputs, problems = discover(config)
    except SelectionError as err:
        raise UsageError(str(err), EXIT_NO_DATA if err.no_data else EXIT_USAGE) from None
    for problem in problems:
        LOGGER.error("%s", problem)
    refused = _record_refused_units(config, problems)
    LOGGER.info("%d participant/session unit(s) to process, %d refused for their inputs",
                len(inputs), len(refused))
    code = EXIT_OK
    if inputs:
        config = _threads_for_units(config, len(inputs))
        config = _with_radiomics_params(config)
        configure_nipype(config.verbosity)
        from ..workflows.participant import run_participants

        code = int(run_participants(config, inputs, problems))
    labels = [_unit_label(i.subject, i.session) for i in inputs] + list(refused)
    _log_unit_summary(config, labels, since)
    return _participant_exit(config, code, bool(inputs), problems)


def _unit_label(subject: str, session: str | None) -> str:
    """``sub-X[_ses-Y]``: the prefix of a unit's outputs and of its ``logs/`` records."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def _record_refused_units(config: AppConfig, problems: Sequence) -> dict[str, str]:
    """A ``logs/`` record for every unit refused before the workflow; returns label -> status.

    ``skipped`` when only required inputs are missing (nothing matched), ``failed`` when a file is
    there but unusable (truncated, all NaN, wrong grid): the record holds every reason, the first file.
    """
    from .. import derivatives as drv

    by_unit: dict[str, list] = {}
    for problem in problems:
        by_unit.setdefault(_unit_label(problem.subject, problem.session), []).append(problem)
    if not by_unit:
        return {}
    drv.init_output_dir(config.output_dir, config.bids_dir, config.container)
    record = drv.config_record(config)
    statuses: dict[str, str] = {}
    for label, found in by_unit.items():
        statuses[label] = "skipped" if all(p.missing for p in found) else "failed"
        reason = "; ".join(f"{p.file}: {p.message}" if p.file else p.message for p in found)
        file = next((p.file for p in found if p.file is not None), None)
        drv.write_unit_log(config.output_dir, label, config.command_line, record, statuses[label], reason, file)
    return statuses


def _log_unit_summary(config: AppConfig, labels: Sequence[str], since: datetime) -> None:
    """The run's closing lines, after nipype's: units done / failed / skipped, each with its reason and log."""
    from .. import derivatives as drv

    def this_run(record: dict | None) -> bool:  # not an earlier run's record of the same unit
        return bool(record and record.get("started_at")) and datetime.fromisoformat(record["started_at"]) >= since

    records = drv.latest_unit_logs(config.output_dir)
    outcome: dict[str, list[str]] = {"done": [], "failed": [], "skipped": [], "not run": []}
    for label in dict.fromkeys(labels):
        record = records.get(label)
        outcome[record["status"] if this_run(record) else "not run"].append(label)
    LOGGER.info("summary: %d done, %d failed, %d skipped for missing inputs%s (of %d participant/session "
                "units); one record per unit in %s", len(outcome["done"]), len(outcome["failed"]),
                len(outcome["skipped"]), f", {len(outcome['not run'])} not run" if outcome["not run"] else "",
                len(labels), Path(config.output_dir) / "logs")
    if outcome["done"]:
        LOGGER.info("  done: %s", ", ".join(outcome["done"]))
    for status, log in (("failed", LOGGER.error), ("skipped", LOGGER.warning)):
        for label in outcome[status]:
            record = records[label]
            log("  %s %s: %s (log: %s)", status, label, record.get("reason") or record.get("error", "?"),
                record["log_file"])
    if outcome["not run"]:
        LOGGER.error("  not run (see the error above): %s", ", ".join(outcome["not run"]))


def _participant_exit(config: AppConfig, code: int, any_ran: bool, problems: Sequence) -> int:
    """1 when a unit failed (a step, or an unusable input); else 66 when a selected unit lacks a required
    input; 18 instead when nothing at all could run because the --bids-filter-file queries matched nothing."""
    if code:
        return code
    if any(not p.missing for p in problems):
        return EXIT_PARTICIPANT_FAILED
    if not problems:
        return EXIT_OK
    if not any_ran and config.bids_filters:
        LOGGER.error("the selection matched no input files of any participant; check --participant-label, "
                     "--session-label and --bids-filter-file")
        return EXIT_NO_DATA
    if not any_ran:
        LOGGER.error("no selected participant/session has the inputs qsmrim needs (QSM *_Chimap, FLAIR, "
                     "lesion mask): add the files named above to the dataset or its derivatives, or point "
                     "-d at the pipelines' outputs that hold them")
    else:
        LOGGER.warning("some participants/sessions were skipped for missing inputs (listed above); "
                       "exit code %d", EXIT_INPUT_MISSING)
    return EXIT_INPUT_MISSING


def _with_radiomics_params(config: AppConfig) -> AppConfig:
    """The radiomics YAML, read and validated once here; every unit's node gets the result."""
    from ..radiomics import RadiomicsConfigError, load_params

    try:
        params = load_params(config.preproc.radiomics_params)
    except RadiomicsConfigError as err:
        raise UsageError(str(err), EXIT_INPUT_MISSING) from None
    return replace(config, preproc=replace(config.preproc, radiomics=params))


def _threads_for_units(config: AppConfig, n_units: int) -> AppConfig:
    """Several units run side by side: unless --omp-nthreads was given, split --nprocs between them.

    A 2-thread N4 of one unit would otherwise wait for both cores while the other unit's
    single-threaded registration holds one of them.
    """
    threads = max(1, min(8, config.nprocs // max(1, n_units)))
    if n_units < 2 or config.omp_nthreads_given or threads == config.omp_nthreads:
        return config
    LOGGER.info("%d units share %d processes: %d thread(s) per process (set --omp-nthreads to change)",
                n_units, config.nprocs, threads)
    _limit_threads(threads)
    return replace(config, omp_nthreads=threads)


def run_group_level(config: AppConfig) -> int:
    """The group level reads the participant outputs; nothing to discover in bids_dir."""
    configure_nipype(config.verbosity)
    from ..bids import SelectionError
    from ..model.finetune import InitModelError
    from ..model.fusion import FusionError
    from ..workflows.group import run_group
    from ..workflows.recalibrate import RecalibrationError

    try:
        return int(run_group(config))
    except (InitModelError, FusionError, RecalibrationError, SelectionError) as err:  # found once the lesions are gathered
        raise UsageError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``qsmrim``, ``run.py``): returns the process exit code."""
    # No network call home from nipype, set before anything imports it.
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help/--version (0) and usage errors (64) end here
        return int(exit_.code or 0)
    setup_logging(args.verbose)
    try:
        config = build_config(args, argv)
        _limit_threads(config.omp_nthreads)
        _validate_dataset(config)
        LOGGER.info("qsmrim %s: %s level on %s -> %s (work: %s)", _version(), config.analysis_level,
                    config.bids_dir, config.output_dir, config.work_dir)
        if config.analysis_level == "participant":
            return run_participant_level(config)
        return run_group_level(config)
    except UsageError as err:
        LOGGER.error("%s", err)
        return err.code
    except KeyboardInterrupt:
        LOGGER.error("interrupted")
        return EXIT_INTERRUPTED


def _limit_threads(n: int) -> None:
    """--omp-nthreads bounds every threaded library (set before they are imported; workers inherit it)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(n)


def _version() -> str:
    from .. import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
