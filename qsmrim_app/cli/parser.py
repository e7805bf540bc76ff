"""The qsmrim command line (BIDS Apps conventions): argparse only, no side effects.

Checks that need nothing but the option's own value (label syntax, the filter file's schema,
the plugin file) are done here so that a bad value is a usage error (exit 64) before any work.
Checks that relate options to each other or to the file system live in ``cli/run.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from .common import (ArgumentParser, HelpFormatter, at_least_two, existing_path, non_negative_int, positive_float,
                     positive_int, probability, visible_option_strings)
from .exitcodes import EXIT_USAGE, exit_code_lines
from ..config import PreprocConfig
from ..lesion_split import LESION_THRESHOLD, SPLIT_METHODS
from ..lesions import MIN_LESION_VOXELS
from ..model.config import PROTOCOLS
from ..model.inputs import DEFAULT_LEVEL, FEATURE_SETS, LEVELS
from ..model.methods import ALL_METHODS


#: The input kinds a ``--bids-filter-file`` may hold a PyBIDS query for.
FILTER_KINDS: tuple[str, ...] = ("qsm", "flair", "magnitude", "lesion_mask", "rim_labels")

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
# Entities PyBIDS knows (its 'bids' and 'derivatives' configurations) plus the query keywords.
_FILTER_ENTITIES: frozenset[str] = frozenset(
    {
        "acquisition", "ceagent", "chunk", "datatype", "direction", "echo", "extension", "flip",
        "inv", "modality", "mt", "nucleus", "part", "proc", "reconstruction", "recording", "run",
        "sample", "session", "space", "staining", "subject", "suffix", "task", "tracer",
        "atlas", "den", "desc", "from", "hemi", "label", "mode", "model", "res", "roi",
        "segmentation", "subset", "to", "scope",
    }
)


class _Removed(argparse.Action):
    """An option of an earlier version: refused with what replaced it, not 'unrecognized argument'."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, nargs="*", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        parser.error(f"{option_string} was removed: {self.replacement}")


def _label(value: str) -> str:
    """A BIDS label; a leading ``sub-``/``ses-`` is stripped so both spellings work."""
    value = value.strip()
    for prefix in ("sub-", "ses-"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    if not _LABEL_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a BIDS label (letters and digits only)")
    return value


def validate_bids_filters(filters: Any) -> dict[str, dict[str, Any]]:
    """Check a ``--bids-filter-file`` document; raises ValueError naming the first bad key.

    The accepted shape is fMRIPrep's: ``{kind: {entity: value | [values] | null | "<Query.ANY>"}}``
    with ``kind`` one of :data:`FILTER_KINDS`.
    """
    if not isinstance(filters, dict):
        raise ValueError("the top level must be a JSON object keyed by input kind")
    for kind, query in filters.items():
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown input kind {kind!r}; expected one of {', '.join(FILTER_KINDS)}")
        if not isinstance(query, dict):
            raise ValueError(f"the query for {kind!r} must be a JSON object of entity: value")
        for entity, val in query.items():
            if entity not in _FILTER_ENTITIES:
                raise ValueError(f"unknown BIDS entity {entity!r} in the query for {kind!r}")
            values = val if isinstance(val, list) else [val]
            for item in values:
                if item is not None and not isinstance(item, (str, int, bool)):
                    raise ValueError(f"value {item!r} of {kind}.{entity} must be a string, number, "
                                     "boolean, null or a list of these")
    return filters


def _bids_filter_file(value: str) -> dict[str, dict[str, Any]]:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"BIDS filter file {value} does not exist")
    try:
        filters = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"BIDS filter file {value} is not valid JSON: {err}") from None
    try:
        return validate_bids_filters(filters)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"BIDS filter file {value}: {err}") from None


def _plugin_file(value: str) -> dict[str, Any]:
    """A nipype plugin YAML: ``plugin: MultiProc`` and optional ``plugin_args: {...}``."""
    import yaml

    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"plugin file {value} does not exist")
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"plugin file {value} is not valid YAML: {err}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("plugin"), str):
        raise argparse.ArgumentTypeError(f"plugin file {value} must have a 'plugin' name (e.g. MultiProc)")
    unknown = set(settings) - {"plugin", "plugin_args"}
    if unknown:
        raise argparse.ArgumentTypeError(f"plugin file {value}: unknown keys {sorted(unknown)}")
    args = settings.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise argparse.ArgumentTypeError(f"plugin file {value}: 'plugin_args' must be a mapping")
    return {"plugin": settings["plugin"], "plugin_args": args}


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The one parser of ``run.py`` / ``qsmrim``: positional BIDS Apps arguments plus options."""
    parser = ArgumentParser(
        prog="qsmrim",
        description=(
            "qsmrim: find chronic active (rim+) multiple sclerosis lesions on quantitative "
            "susceptibility maps with QSMRim-Net (Zhang et al., NeuroImage: Clinical 2022). "
            "A BIDS App: the participant level classifies every lesion of each participant; the "
            "group level gathers the participants' results (and, with --train, trains a model)."
        ),
        formatter_class=HelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument("bids_dir", type=Path,
                        help="the root of the input BIDS dataset (read only; nothing is ever written there)")
    parser.add_argument("output_dir", type=Path,
                        help="where the derivatives go; may be <bids_dir>/derivatives/<name> but not "
                             "elsewhere inside bids_dir")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant': one unit of work per participant and session; "
                             "'group': summarise (or --train on) the participant-level outputs")
    parser.add_argument("--version", action="version", version=f"qsmrim {__version__}")

    sel = parser.add_argument_group("Selecting the inputs")
    sel.add_argument("--participant-label", "--participant_label", dest="participant_label",
                     nargs="+", type=_label, default=[], metavar="LABEL",
                     help="participants to process (with or without 'sub-'); default: all of them")
    sel.add_argument("--session-label", "--session_label", dest="session_label",
                     nargs="+", type=_label, default=[], metavar="LABEL",
                     help="sessions to process (with or without 'ses-'); default: all of them")
    sel.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filters",
                     type=_bids_filter_file, default=None, metavar="FILE",
                     help="JSON file of PyBIDS queries per input kind (keys: "
                          + ", ".join(FILTER_KINDS) + "), e.g. {\"qsm\": {\"acquisition\": \"gre\"}} "
                          "to pick one of several runs or acquisitions")
    sel.add_argument("-d", "--derivatives", nargs="+", type=existing_path, default=[], metavar="PATH",
                     help="extra derivatives datasets holding QSM maps, lesion masks or rim "
                          "annotations; every folder in <bids_dir>/derivatives is searched anyway")
    sel.add_argument("--rim-annotations", "--rim_annotations", dest="rim_annotations", type=existing_path,
                     default=None, metavar="PATH",
                     help="the dataset to take rim annotations (*_desc-rim_dseg) from, e.g. a qsmrim-review "
                          "folder; only it is searched for them; default: the raw dataset and its derivatives")
    sel.add_argument("--qsm-units", "--qsm_units", dest="qsm_units", choices=["ppm", "ppb"], default=None,
                     help="units of the QSM maps when they do not follow BIDS; default: ppm as "
                          "BIDS specifies for Chimap")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                     action="store_true",
                     help="do not check the raw dataset against the BIDS specification")

    perf = parser.add_argument_group("Resources")
    perf.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path, default=None,
                      help="folder for intermediate files; default: <parent of output_dir>/qsmrim_work "
                           "(or <parent of bids_dir>/qsmrim_work when output_dir is inside bids_dir); "
                           "never inside bids_dir")
    perf.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=positive_int,
                      default=_available_cpus(),
                      help="processes running at once, over all participants/sessions of the run "
                           "(several units run side by side)")
    perf.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=positive_int,
                      default=None, help="threads per process (torch, BLAS, radiomics workers; ITK steps run "
                           "single-threaded for repeatable results); default: min(8, nprocs) for one "
                           "unit, nprocs / units (at least 1) when several units run side by side")
    perf.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=positive_float, default=None,
                      help="memory the run may use, in GB: nodes start only while their estimated memory "
                           "fits; default: 90%% of the machine's memory")
    perf.add_argument("--use-plugin", "--use_plugin", dest="use_plugin", type=_plugin_file,
                      default=None, metavar="FILE",
                      help="nipype plugin YAML with 'plugin' and optional 'plugin_args'; "
                           "default: MultiProc with --nprocs")
    perf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="where the network runs; 'auto' uses a CUDA GPU when one is available")

    model = parser.add_argument_group("Classification")
    model.add_argument("--model", type=existing_path, default=None, metavar="PATH",
                       help="a model directory written by 'group --train'; default: the bundled model")
    model.add_argument("--threshold", type=probability, default=None, metavar="VALUE",
                       help="probability above which a lesion is called rim+; overrides "
                            "--operating-point; default: the model's threshold for the operating point")
    model.add_argument("--operating-point", "--operating_point", dest="operating_point",
                       choices=["f1", "high-sensitivity"], default="f1",
                       help="which of the model's stored thresholds to use")
    model.add_argument("--no-classify", "--no_classify", dest="no_classify", action="store_true",
                       help="stop after preprocessing (registration, lesions, patches, radiomics, "
                            "annotations): prepares a cohort for 'group --train' without any model")

    pre = parser.add_argument_group("Preprocessing")
    pre.add_argument("--min-lesion-voxels", "--min_lesion_voxels", dest="min_lesion_voxels",
                     type=positive_int, default=MIN_LESION_VOXELS, metavar="N",
                     help="lesions (connected components in the QSM grid) smaller than this are ignored")
    pre.add_argument("--patch-extent-mm", "--patch_extent_mm", dest="patch_extent_mm", nargs=3,
                     type=positive_float, default=None, metavar=("X", "Y", "Z"),
                     help="size of each lesion's patch in mm along the world axes; default: the model's "
                          "(the bundled model: 24 24 24)")
    pre.add_argument("--patch-spacing-mm", "--patch_spacing_mm", dest="patch_spacing_mm", nargs=3,
                     type=positive_float, default=None, metavar=("X", "Y", "Z"),
                     help="sampling of the patch in mm (QSM and FLAIR linear, masks nearest); default: the "
                          "model's (the bundled model: 0.75 0.75 1.5)")
    pre.add_argument("--patch-size", "--patch_size", action=_Removed, dest="removed_patch_size",
                     replacement="patches are now defined in mm (QSM voxel sizes differ between scanners); "
                                 "use --patch-extent-mm and --patch-spacing-mm")
    pre.add_argument("--registration", choices=["rigid", "affine", "header"], default="rigid",
                     help="FLAIR-to-QSM/magnitude registration: rigid (default; FLAIR and GRE of one session "
                          "are one rigid head), affine (rigid, then 12 parameters; only for data that "
                          "needs it, e.g. a FLAIR from another session with a different scanner calibration) "
                          "or header (no optimisation: a FLAIR already aligned to the QSM by another tool). "
                          "Every registration is checked by the registration gate")
    pre.add_argument("--registration-gate-mm", "--registration_gate_mm", dest="registration_gate_mm",
                     type=positive_float, default=PreprocConfig.registration_gate_mm, metavar="MM",
                     help="registration gate: a unit whose FLAIR alignment disagrees with the brain outlines by "
                          "more than this (mean over the brain, mm) fails the gate; its outputs are written "
                          "for review, the participant level exits 1 and the group level leaves its counts "
                          "out (docs/registration.md)")
    pre.add_argument("--lesion-split", "--lesion_split", dest="lesion_split", choices=SPLIT_METHODS,
                     default=PreprocConfig.lesion_split,
                     help="binary masks and probability maps: 'auto' splits confluent lesions into lesion "
                          "centres (Dworkin et al. 2018; Hessian of the smoothed map, in the mask's grid); "
                          "'none' keeps connected components. A rater's instance map (desc-lesion_dseg) is "
                          "never split")
    pre.add_argument("--lesion-threshold", "--lesion_threshold", dest="lesion_threshold", type=probability,
                     default=LESION_THRESHOLD, metavar="P",
                     help="lesion probability maps (and soft 0-1 masks): lesion where the value is >= P")
    pre.add_argument("--n4-shrink-factor", "--n4_shrink_factor", dest="n4_shrink_factor",
                     type=positive_int, default=4, help="FLAIR bias correction (N4) shrink factor")
    pre.add_argument("--n4-iterations", "--n4_iterations", dest="n4_iterations", nargs="+",
                     type=non_negative_int, default=[50, 50, 30], metavar="N",
                     help="N4 iterations per fitting level (one number per level)")

    group = parser.add_argument_group("Group level")
    group.add_argument("--keep-failed-registration", "--keep_failed_registration", dest="keep_failed_registration",
                       action="store_true",
                       help="keep the counts of units whose FLAIR registration failed the registration gate in "
                            "the group table and analysis (default: such units are listed, marked, and their "
                            "counts left out)")

    train = parser.add_argument_group("Group level: training")
    train.add_argument("--train", action="store_true",
                       help="at the group level, train a model (cross-validated) from the participants' "
                            "rim annotations (desc-rim_dseg) and write it to <output_dir>/models/<model-id>/")
    train.add_argument("--recalibrate", action="store_true",
                       help="at the group level, refit the model's calibration and operating points on the lesions "
                            "a rater reviewed (--rim-annotations: the qsmrim-review folder) and write a site model "
                            "to <output_dir>/models/<model-id>-site-<hash>/ (docs/calibration.md)")
    train.add_argument("--method", choices=[*ALL_METHODS, "all"], default=None,
                       help="what --train trains: QSMRim-Net, a comparator (aprl-rf, aprl-nn, rimnet), "
                            "an ablation (image-only, image-radiomics = no DeepSMOTE), a floor (rf, logreg "
                            "on the 527 features; shell-core, the training-free rim-minus-core score), fusion (the "
                            "image-only network and the features-only model trained apart, their mean calibrated: "
                            "the bundled model's recipe), or all of them through the same folds, into one table "
                            "(default: qsmrimnet; with --init-model, that model's method)")
    train.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                       help="training recipe: 'paper' (Adam 1e-4, batch 64, 40 epochs, LR steps at 50/70/90%%, "
                            "5 folds x 3 seeds, width 1.0; hours on a CPU) or 'fast' (ours, for a 2-core CPU: "
                            "width 0.125, 200 steps of 32 patches, one-cycle AdamW 1e-3, rim+-enriched batches, early "
                            "stopping on an inner split, 5 folds x 1 seed); --epochs/--folds/--seeds/"
                            "--width-multiplier override either")
    train.add_argument("--inputs", choices=LEVELS, default=DEFAULT_LEVEL,
                       help="what the networks see (cumulative): 'paper' lesion-only patch + 527 features; "
                            "'margin' + surrounding tissue and an outline channel; 'radial' + radial-profile "
                            "features; 'referenced' + QSM relative to the lesion's local reference tissue; 'tissue' + the "
                            "first-order radiomic features relative to that tissue too")
    train.add_argument("--feature-set", "--feature_set", dest="feature_set", choices=FEATURE_SETS, default=None,
                       help="the pyradiomics columns the feature methods read: 'no-voxel-counts' (the fast "
                            "protocol's default) leaves out those that count voxels of the scan's own grid "
                            "(run-length GLRLM, first-order Energy), which moved one lesion's probability from "
                            "0.15 to 0.31 between 0.75 x 0.75 x 3 and 0.6 x 0.6 x 2 mm grids; 'all' (the paper "
                            "protocol's default) keeps the paper's 527; with --init-model, that model's")
    train.add_argument("--epochs", type=positive_int, default=None,
                       help="training epochs (paper protocol: 40)")
    train.add_argument("--folds", type=at_least_two, default=None,
                       help="subject-stratified cross-validation folds (>= 2; both protocols: 5); the "
                            "ensemble keeps every fold's networks")
    train.add_argument("--cv-group-by", "--cv_group_by", dest="cv_group_by", metavar="COLUMN", default=None,
                       help="a participants.tsv column (e.g. site or scanner) whose values the folds keep "
                            "whole: the out-of-fold predictions, the calibration map and the operating points "
                            "are then those of a site the members did not see (folds = min(--folds, number "
                            "of values)); default: the participant")
    train.add_argument("--seeds", type=positive_int, default=None,
                       help="networks trained per fold with different seeds (paper: 3, fast: 1)")
    train.add_argument("--max-steps", "--max_steps", dest="max_steps", type=positive_int, default=None,
                       help="optimisation steps per network (the fast protocol's budget: 200); replaces "
                            "--epochs as the stopping rule")
    train.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=None,
                       help="mini-batch size (paper: 64, fast: 32)")
    train.add_argument("--width-multiplier", "--width_multiplier", dest="width_multiplier",
                       type=positive_float, default=None,
                       help="scales the network's channel widths (1.0: the paper's ResNet-18, the paper "
                            "protocol's default; fast: 0.125)")
    train.add_argument("--init-model", "--init_model", dest="init_model", type=existing_path, default=None,
                       metavar="PATH",
                       help="fine-tune: start each network from the matching fold/seed member of this model "
                            "directory (e.g. the bundled one; its first member when it has fewer); its inputs "
                            "and architecture must match the run's")
    train.add_argument("--weights-fp16", "--weights_fp16", dest="weights_fp16", action="store_true",
                       help="store the trained weights as float16 (half the size; for shipping a model)")

    other = parser.add_argument_group("Other")
    other.add_argument("-v", "--verbose", dest="verbose", action="count", default=0,
                       help="more log output; the default is INFO (progress, one line per finished step, "
                            "warnings); -v adds qsmrim's DEBUG lines and nipype's and pybids' INFO, -vv "
                            "everything at DEBUG")
    return parser


def _epilog() -> str:
    """Exit codes and companion commands: what a user scripting around qsmrim needs after the options."""
    return "\n".join([
        "exit codes:",
        *exit_code_lines(),
        "",
        "companion commands:",
        "  qsmrim-review OUTPUT_DIR [--rater NAME]",
        "         review the rim+ candidates in a browser; the decisions are a BIDS",
        "         dataset for --rim-annotations and group --train",
        "  qsmrim-synth OUT [--subjects 3]",
        "         write a phantom BIDS dataset (with rim annotations) to try qsmrim on",
        "",
        "Every option also accepts its underscore spelling (e.g. --participant_label), as other BIDS Apps do. "
        "Each participant/session's outcome is recorded in <output_dir>/logs/.",
    ])
