"""The command line: options, refusals and exit codes, through main() and through run.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qsmrim_app.cli.parser import build_parser
from qsmrim_app.cli.run import main
from qsmrim_app.synthetic import break_participant
from conftest import tree_digest
from test_bids import make_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace both workflow modules: records what main() hands them, returns a chosen exit code."""
    calls: dict = {"participant": None, "group": None, "code": 0}

    def run_participants(config, inputs, problems):
        calls["participant"] = (config, list(inputs), list(problems))
        return calls["code"]

    def run_group(config):
        calls["group"] = config
        return calls["code"]

    participant = types.ModuleType("qsmrim_app.workflows.participant")
    participant.run_participants = run_participants
    group = types.ModuleType("qsmrim_app.workflows.group")
    group.run_group = run_group
    monkeypatch.setitem(sys.modules, "qsmrim_app.workflows.participant", participant)
    monkeypatch.setitem(sys.modules, "qsmrim_app.workflows.group", group)
    return calls


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=REPO_ROOT)


# -- through run.py as the container runs it ----------------------------------------------------
def test_version_prints_version_file() -> None:
    result = _run_script("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qsmrim {(REPO_ROOT / 'version').read_text().strip()}"


def test_missing_bids_dir_exits_66(tmp_path: Path) -> None:
    result = _run_script(str(tmp_path / "nope"), str(tmp_path / "out"), "participant")
    assert result.returncode == 66
    assert f"{tmp_path / 'nope'} does not exist" in result.stderr


def test_usage_error_exits_64_with_usage(tmp_path: Path) -> None:
    result = _run_script(str(tmp_path), str(tmp_path / "out"), "everything")
    assert result.returncode == 64
    assert result.stderr.startswith("usage: qsmrim") and "invalid choice: 'everything'" in result.stderr


def test_invalid_dataset_exits_16_naming_paths(tmp_path: Path, dataset: Path) -> None:
    (dataset / "dataset_description.json").unlink()
    stray = dataset / "sub-01/anat/sub-01_notbids.nii.gz"
    stray.write_bytes(b"")
    result = _run_script(str(dataset), str(tmp_path / "out"), "participant")
    assert result.returncode == 16
    assert "dataset_description.json: missing" in result.stderr and str(stray) in result.stderr
    assert "--skip-bids-validation" in result.stderr
    assert not (tmp_path / "out").exists()


# -- through main() ------------------------------------------------------------------------------
def test_help_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--participant-label", "--bids-filter-file", "--qsm-units", "--min-lesion-voxels",
                   "--operating-point", "--width-multiplier", "--method"):
        assert option in text
    assert "(default: 10)" in text  # --min-lesion-voxels


@pytest.mark.parametrize("options, message", [
    (["--threshold", "1.5"], "must be a probability"),
    (["--participant-label", "sub-0_1"], "is not a BIDS label"),
    (["--min-lesion-voxels", "0"], "must be >= 1"),
    (["--patch-extent-mm", "32", "32"], "expected 3 argument"),
    (["--patch-size", "32", "32", "16"], "use --patch-extent-mm and --patch-spacing-mm"),
    (["--device", "tpu"], "invalid choice"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--lesion-split", "watershed"], "invalid choice"),
    (["--lesion-threshold", "1.2"], "must be a probability"),
])
def test_bad_option_values_exit_64(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   options: list[str], message: str) -> None:
    assert main([str(tmp_path), str(tmp_path / "out"), "participant", *options]) == 64
    assert message in capsys.readouterr().err


def test_filter_file_validation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad_kind = tmp_path / "bad_kind.json"
    bad_kind.write_text(json.dumps({"t1w": {"suffix": "T1w"}}))
    assert main([str(tmp_path), str(tmp_path / "o"), "participant", "--bids-filter-file", str(bad_kind)]) == 64
    assert "unknown input kind 't1w'" in capsys.readouterr().err
    bad_entity = tmp_path / "bad_entity.json"
    bad_entity.write_text(json.dumps({"qsm": {"acqusition": "x"}}))
    assert main([str(tmp_path), str(tmp_path / "o"), "participant", "--bids-filter-file", str(bad_entity)]) == 64
    assert "unknown BIDS entity 'acqusition'" in capsys.readouterr().err
    not_json = tmp_path / "broken.json"
    not_json.write_text("{qsm:")
    assert main([str(tmp_path), str(tmp_path / "o"), "participant", "--bids-filter-file", str(not_json)]) == 64
    assert "not valid JSON" in capsys.readouterr().err


def test_plugin_file(tmp_path: Path, dataset: Path, dispatched: dict, capsys: pytest.CaptureFixture) -> None:
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {stop_on_first_crash: true}\n")
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)]) == 0
    config = dispatched["participant"][0]
    assert config.plugin == "Linear" and config.plugin_args == {"stop_on_first_crash": True}
    plugin.write_text("plugin_args: {}\n")
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)]) == 64
    assert "must have a 'plugin' name" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_bids_dir_refused(tmp_path: Path, dataset: Path, dispatched: dict,
                                    capsys: pytest.CaptureFixture, where: str) -> None:
    output = dataset if where == "same" else dataset / "results"
    assert main([str(dataset), str(output), "participant"]) == 64
    err = capsys.readouterr().err
    assert "is inside the input dataset" in err and "derivatives/qsmrim" in err
    assert dispatched["participant"] is None


def test_output_under_derivatives_allowed_work_dir_outside(tmp_path: Path, dataset: Path, dispatched: dict) -> None:
    output = dataset / "derivatives" / "qsmrim"
    assert main([str(dataset), str(output), "participant"]) == 0
    config = dispatched["participant"][0]
    assert config.output_dir == output.resolve()
    assert config.work_dir == (tmp_path / "qsmrim_work").resolve()  # beside bids_dir, not inside it


def test_work_dir_inside_bids_dir_refused(tmp_path: Path, dataset: Path, dispatched: dict,
                                          capsys: pytest.CaptureFixture) -> None:
    work = dataset / "derivatives" / "work"
    assert main([str(dataset), str(tmp_path / "out"), "participant", "-w", str(work)]) == 64
    assert f"work directory {work.resolve()} is inside the input dataset" in capsys.readouterr().err


def test_config_from_options(tmp_path: Path, dataset: Path, dispatched: dict) -> None:
    output = tmp_path / "derivs" / "qsmrim"
    argv = [str(dataset), str(output), "participant", "--participant_label", "sub-01", "03",
            "--threshold", "0.3", "--operating-point", "high-sensitivity", "--qsm-units", "ppm",
            "--min-lesion-voxels", "5", "--n4-iterations", "10", "10", "--n4-shrink-factor", "2",
            "--nprocs", "3", "--mem-gb", "6", "--device", "cpu", "-vv", "--method", "all",
            "--registration", "affine"]
    assert main(argv) == 0
    config, inputs, problems = dispatched["participant"]
    assert config.participant_labels == ("01", "03")
    assert [i.subject for i in inputs] == ["01", "03"] and problems == []
    assert config.work_dir == (tmp_path / "derivs" / "qsmrim_work").resolve()
    assert config.inference.threshold == 0.3 and config.inference.operating_point == "high-sensitivity"
    assert config.preproc.min_lesion_voxels == 5 and config.preproc.n4_iterations == (10, 10)
    assert config.preproc.n4_shrink_factor == 2 and config.preproc.qsm_units == "ppm"
    assert config.preproc.registration == "affine"
    # two units share the 3 processes: one thread each unless --omp-nthreads is given
    assert config.nprocs == 3 and config.omp_nthreads == 1
    assert config.plugin == "MultiProc" and config.plugin_args == {"n_procs": 3, "memory_gb": 6.0}
    assert config.device == "cpu" and config.training.device == "cpu" and config.verbosity == 2
    assert config.train_methods == ("qsmrimnet", "aprl-rf", "aprl-nn", "rimnet", "image-only", "image-radiomics",
                                    "rf", "logreg", "features-only", "fusion", "shell-core")
    assert config.command_line == tuple(argv)
    assert os.environ.get("NIPYPE_NO_ET") == "1"


def test_unknown_participant_label(tmp_path: Path, dataset: Path, dispatched: dict,
                                   capsys: pytest.CaptureFixture) -> None:
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--participant-label", "01", "09"]) == 64
    err = capsys.readouterr().err
    assert "participant label(s) 09 not found" in err and "existing participants: 01, 02, 03" in err
    assert dispatched["participant"] is None


def test_filter_selecting_nothing_exits_18(tmp_path: Path, dataset: Path, dispatched: dict,
                                           capsys: pytest.CaptureFixture) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"qsm": {"acquisition": "none"}}))
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)]) == 18
    assert "--bids-filter-file" in capsys.readouterr().err
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--session-label", "5"]) == 18
    assert dispatched["participant"] is None


def test_broken_participant_exits_1_others_dispatched(tmp_path: Path, phantom_copy: Path, dispatched: dict,
                                                      capsys: pytest.CaptureFixture) -> None:
    (culprit,) = break_participant(phantom_copy, "02", "nan-qsm")
    before = tree_digest(phantom_copy)
    assert main([str(phantom_copy), str(tmp_path / "out"), "participant"]) == 1
    _, inputs, problems = dispatched["participant"]
    assert [i.subject for i in inputs] == ["01", "03"]
    assert [p.subject for p in problems] == ["02"]
    err = capsys.readouterr().err
    assert f"sub-02: {culprit}: holds no finite non-zero value" in err
    assert tree_digest(phantom_copy) == before


def test_output_in_derivatives_run_leaves_raw_untouched(phantom_copy: Path, dispatched: dict) -> None:
    before = tree_digest(phantom_copy)
    output = phantom_copy / "derivatives" / "qsmrim"
    assert main([str(phantom_copy), str(output), "participant", "--participant-label", "sub-03"]) == 0
    _, inputs, _ = dispatched["participant"]
    assert [i.subject for i in inputs] == ["03"]
    assert tree_digest(phantom_copy) == before


def test_workflow_failure_code_passed_on(tmp_path: Path, dataset: Path, dispatched: dict) -> None:
    dispatched["code"] = 1
    assert main([str(dataset), str(tmp_path / "out"), "participant"]) == 1


def test_skip_bids_validation(tmp_path: Path, dataset: Path, dispatched: dict) -> None:
    (dataset / "sub-01/anat/sub-01_notbids.txt").write_text("x")
    assert main([str(dataset), str(tmp_path / "out"), "participant"]) == 16
    assert main([str(dataset), str(tmp_path / "out"), "participant", "--skip-bids-validation"]) == 0
    assert dispatched["participant"][0].skip_bids_validation


def test_group_level(tmp_path: Path, dataset: Path, dispatched: dict, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    assert main([str(dataset), str(output), "group"]) == 66
    assert "run the participant level first" in capsys.readouterr().err
    output.mkdir()
    argv = [str(dataset), str(output), "group", "--train", "--epochs", "2", "--folds", "2", "--seeds", "1",
            "--batch-size", "8", "--width-multiplier", "0.25", "--method", "aprl-rf"]
    assert main(argv) == 0
    config = dispatched["group"]
    assert config.analysis_level == "group" and config.train
    assert config.training.epochs == 2 and config.training.folds == 2 and config.training.seeds == 1
    assert config.training.batch_size == 8 and config.training.width_multiplier == 0.25
    assert config.training.method == "aprl-rf" and config.train_methods == ("aprl-rf",)
    assert dispatched["participant"] is None
    dispatched["code"] = 1
    assert main([str(dataset), str(output), "group"]) == 1


def test_protocol_settings_reach_the_trainer(tmp_path: Path, dataset: Path, dispatched: dict) -> None:
    """--protocol picks a recipe; explicit --epochs/--folds/--seeds/--width-multiplier override it."""
    output = tmp_path / "out"
    output.mkdir()
    assert main([str(dataset), str(output), "group", "--train"]) == 0
    paper = dispatched["group"].training
    assert (paper.protocol, paper.epochs, paper.folds, paper.seeds, paper.width_multiplier) == ("paper", 40, 5, 3, 1.0)
    assert paper.learning_rate == 1e-4 and paper.batch_size == 64 and paper.max_steps is None
    assert paper.lr_milestones == (0.5, 0.7, 0.9) and paper.input_level == "referenced"
    assert paper.feature_set == "all"  # the paper's 527 pyradiomics features
    assert main([str(dataset), str(output), "group", "--train", "--protocol", "fast"]) == 0
    fast = dispatched["group"].training
    assert fast.protocol == "fast" and fast.max_steps == 200 and fast.seeds == 1 and fast.width_multiplier == 0.125
    assert fast.batch_size == 32 and fast.inner_val_fraction > 0 and fast.positive_fraction and fast.lr_schedule == "onecycle"
    assert fast.feature_set == "no-voxel-counts"
    assert main([str(dataset), str(output), "group", "--train", "--protocol", "fast", "--feature-set", "all"]) == 0
    assert dispatched["group"].training.feature_set == "all"
    assert main([str(dataset), str(output), "group", "--train", "--protocol", "fast", "--seeds", "2",
                 "--width-multiplier", "0.25", "--folds", "3", "--inputs", "paper"]) == 0
    mixed = dispatched["group"].training
    assert (mixed.seeds, mixed.width_multiplier, mixed.folds, mixed.max_steps) == (2, 0.25, 3, 200)
    assert mixed.input_level == "paper"
    assert main([str(dataset), str(output), "group", "--train", "--patch-extent-mm", "20", "20", "20",
                 "--patch-spacing-mm", "0.75", "0.75", "1.5"]) == 64  # 20 / 0.75 is not a whole number


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["/b", "/o", "participant"])
    assert args.min_lesion_voxels == 10 and args.patch_extent_mm is None and args.patch_spacing_mm is None
    assert args.protocol == "paper" and args.inputs == "referenced" and args.epochs is None
    assert args.operating_point == "f1" and args.device == "auto" and args.method is None
    assert args.threshold is None and args.qsm_units is None and args.verbose == 0
    assert args.participant_label == [] and args.bids_filters is None
    assert args.registration == "rigid"


def test_one_fold_is_a_usage_error(tmp_path):
    from qsmrim_app.cli.run import main

    assert main([str(tmp_path), str(tmp_path / "out"), "group", "--train", "--folds", "1"]) == 64


def test_torch_is_not_loaded_before_the_thread_limit(tmp_path: Path, dataset: Path) -> None:
    """--omp-nthreads reaches torch only if torch loads after cli/run.py set OMP_NUM_THREADS (libgomp reads
    it once, when it loads): building the configuration must not import torch (it did through
    model.network's method list before the method registry, so `group --train` ignored the option)."""
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from qsmrim_app.cli.parser import build_parser; import qsmrim_app.cli.run as r; "
            f"a = build_parser().parse_args([{str(dataset)!r}, {str(out)!r}, 'group', '--train', '--method', "
            "'all', '--omp-nthreads', '1']); r.build_config(a, []); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_cv_group_by_only_with_group_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bids").mkdir()
    for level in (["participant"], ["group"]):
        assert main([str(tmp_path / "bids"), str(tmp_path / "out"), *level, "--cv-group-by", "site"]) == 64
        assert "--cv-group-by only applies to `group --train`" in capsys.readouterr().err
