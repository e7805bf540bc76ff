"""The one typed configuration object that flows from the command line to where it is used."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .lesion_split import LESION_THRESHOLD, SPLIT_METHODS
from .lesions import MIN_LESION_VOXELS
from .model.config import TrainConfig
from .model.inputs import PATCH_EXTENT_MM, PATCH_SPACING_MM

DATA_DIR = Path(__file__).resolve().parent / "data"
RADIOMICS_PARAMS = DATA_DIR / "radiomics.yaml"
BUNDLED_MODEL_DIR = DATA_DIR / "model"


@dataclass(frozen=True)
class PreprocConfig:
    """Participant-level preprocessing knobs (defaults in `qsmrim --help`; the choices in docs/method.md)."""

    n4_shrink_factor: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    n4_convergence: float = 1e-4
    min_lesion_voxels: int = MIN_LESION_VOXELS
    # Lesion patches in mm along the world axes (patches.py); the model's own grid by default.
    patch_extent_mm: tuple[float, float, float] = PATCH_EXTENT_MM
    patch_spacing_mm: tuple[float, float, float] = PATCH_SPACING_MM
    qsm_units: str | None = None  # None: trust BIDS (Chimap is ppm)
    radiomics_params: Path = RADIOMICS_PARAMS
    # The parameters of radiomics_params, read and validated once at start (cli/run.py, radiomics.load_params)
    # and handed to every node; None until then.
    radiomics: dict | None = None
    # A registration whose final Mattes MI is above this (MI is negative, lower is better)
    # did not find a meaningful alignment and is an error for that participant.
    registration_max_metric: float = -0.05
    # FLAIR-to-QSM registration: "rigid" (one session, one head), "affine" (rigid then affine) or "header"
    # (the headers as they are: a FLAIR already aligned by another tool).
    registration: str = "rigid"
    # Registration gate (registration_gate.py): brain-outline disagreement (mm) above which a unit fails it.
    registration_gate_mm: float = 3.0  # registration_gate.GATE_THRESHOLD_MM
    # Binary masks and probability maps: confluent lesions split into lesion centres (lesion_split.py)
    # in the mask's own grid ("none": connected components in the QSM grid); probability >= threshold.
    lesion_split: str = SPLIT_METHODS[0]
    lesion_threshold: float = LESION_THRESHOLD
    split_sigma_mm: float = 1.25
    split_min_centre_mm3: float = 10.0


@dataclass(frozen=True)
class InferenceConfig:
    model_dir: Path = BUNDLED_MODEL_DIR
    threshold: float | None = None
    operating_point: str = "f1"  # or "high-sensitivity"


@dataclass(frozen=True)
class AppConfig:
    """Everything one run needs, validated by ``cli/run.py``; paths are absolute.

    ``work_dir`` defaults (in the CLI) to ``<parent of output_dir>/qsmrim_work``, or to
    ``<parent of bids_dir>/qsmrim_work`` when the output is ``<bids_dir>/derivatives/<name>``,
    so that nothing is ever written inside ``bids_dir``.
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: dict = field(default_factory=dict)
    derivatives: tuple[Path, ...] = ()
    rim_annotations: Path | None = None  # --rim-annotations: the only dataset searched for desc-rim_dseg
    nprocs: int = 1
    omp_nthreads: int = 1
    container: str | None = None  # the image it runs in (cli/common.container_name), recorded in outputs
    omp_nthreads_given: bool = False  # --omp-nthreads on the command line: never split between units
    mem_gb: float | None = None
    device: str = "auto"
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    verbosity: int = 0
    train: bool = False
    recalibrate: bool = False  # group --recalibrate: a site's calibration from its rater (workflows/recalibrate.py)
    classify: bool = True  # False: participant level stops after preprocessing (--no-classify)
    # Group level: keep the counts of units whose registration failed the gate (--keep-failed-registration).
    keep_failed_registration: bool = False
    # What ``--train`` trains (``--method all`` expands to every comparator); training.method is the first.
    train_methods: tuple[str, ...] = ("qsmrimnet",)
    # --cv-group-by: the participants.tsv column (site, scanner) whose values the training folds keep whole.
    cv_group_by: str | None = None
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    command_line: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReviewConfig:
    """What ``qsmrim-review`` needs, validated by ``review/cli.py``; paths are absolute.

    ``review_dir`` is the annotation dataset it writes (never inside ``bids_dir``); ``bids_dir`` is
    where the QSM maps named in the outputs' sidecars are read from (``bids:raw:`` URIs).
    """

    output_dir: Path
    review_dir: Path
    bids_dir: Path | None = None
    model_dir: Path | None = None  # None: the model recorded in the outputs (its model_id)
    operating_point: str = "high-sensitivity"  # or "f1": where the queue's review set ends
    rater: str = "rater"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    container: str | None = None  # the image it runs in (cli/common.container_name), recorded in outputs
