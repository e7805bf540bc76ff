"""Container recipe checks (fast, always) and the real podman build + runs (slow, opt-in).

Why: the image is only built and run by `.ci/container.sh` (podman, minutes); these tests keep the recipe
honest on every run: a multi-stage build whose final stage has no compilers, a non-root user, the OCI
labels, an entrypoint that points at the copied run.py, and read-only-friendly environment variables.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import compare_derivatives as cd  # noqa: E402

COMPILERS = ("gcc", "g++", "clang", "build-essential", "cmake", "python3-dev")


# ---------------------------------------------------------------------------------------------------------
# A small Dockerfile reader: logical instructions (continuations joined, comments dropped) grouped by stage.
def dockerfile_stages(path: Path) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """(global instructions before the first FROM, [stage instructions]) as (KEYWORD, rest) pairs."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    preamble: list[tuple[str, str]] = []
    stages: list[list[tuple[str, str]]] = []
    for text in logical:
        key, _, rest = text.partition(" ")
        item = (key.upper(), rest.strip())
        if item[0] == "FROM":
            stages.append([item])
        elif stages:
            stages[-1].append(item)
        else:
            preamble.append(item)
    return preamble, stages


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, rest in stage:
        if key == "ENV":
            for token in shlex.split(rest):
                name, sep, value = token.partition("=")
                if sep:
                    env[name] = value
    return env


def labels_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, rest in stage:
        if key == "LABEL":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                labels[name] = value
    return labels


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    return dockerfile_stages(REPO / "Dockerfile")


def test_base_image_is_a_pinned_build_arg(dockerfile) -> None:
    preamble, stages = dockerfile
    args = dict(rest.partition("=")[::2] for key, rest in preamble if key == "ARG")
    assert "BASE_IMAGE" in args, "ARG BASE_IMAGE must come before the first FROM"
    default = args["BASE_IMAGE"]
    name, _, tag = default.rpartition(":")
    assert name and tag and tag != "latest", f"BASE_IMAGE default {default!r} must be pinned by tag"
    assert "3.11" in default, "the default base must carry Python 3.11"
    assert all(stage[0][1].split()[0] == "${BASE_IMAGE}" for stage in stages)


def test_multi_stage_with_compilers_only_in_the_builder(dockerfile) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2
    builder_runs = " ".join(rest for key, rest in stages[0] if key == "RUN")
    assert "gcc" in builder_runs, "the builder stage installs the compiler pyradiomics needs"
    assert "requirements.txt" in builder_runs
    final = stages[-1]
    final_runs = " ".join(rest for key, rest in final if key == "RUN")
    for word in COMPILERS:
        assert not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", final_runs), f"{word} in final stage"
    assert "apt-get install" not in final_runs
    copies_from = [rest for key, rest in final if key == "COPY" and rest.startswith("--from=")]
    builder_name = stages[0][0][1].split()[-1]
    assert any(c.startswith(f"--from={builder_name} /opt/venv") for c in copies_from)


def test_app_installed_without_touching_pinned_dependencies(dockerfile) -> None:
    _, stages = dockerfile
    runs = " ".join(rest for key, rest in stages[0] if key == "RUN")
    assert re.search(r"pip install -r \S*requirements\.txt", runs)
    final_runs = " ".join(rest for key, rest in stages[-1] if key == "RUN")
    assert re.search(r"pip install --no-deps --no-index", final_runs), "the app goes in as a wheel, offline"
    copies = [rest for key, rest in stages[-1] if key in ("COPY", "LABEL")]
    assert copies[0].endswith("/opt/venv /opt/venv"), "the venv must be the first (cached) layer"
    assert [k for k, _ in stages[-1]][-4:].count("LABEL") == 1, "per-build labels belong at the end"


def test_final_stage_labels(dockerfile) -> None:
    _, stages = dockerfile
    labels = labels_of(stages[-1])
    for key in ("title", "version", "revision", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${VCS_REF}"
    args = {rest.partition("=")[0] for key, rest in stages[-1] if key == "ARG"}
    assert {"VERSION", "VCS_REF"} <= args


def test_runtime_environment(dockerfile) -> None:
    _, stages = dockerfile
    env = env_of(stages[-1])
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    assert env["NIPYPE_NO_ET"] == "1"
    for var in ("MPLCONFIGDIR", "HOME"):
        assert env[var].startswith("/tmp"), f"{var} must be writable under --read-only with a tmpfs /tmp"
    assert env["QSMRIM_CONTAINER"].startswith("docker://") and "${VERSION}" in env["QSMRIM_CONTAINER"]
    workdirs = [rest for key, rest in stages[-1] if key == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/tmp"), "nipype writes crash files to the cwd"


def test_non_root_user_and_entrypoint(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    users = [rest for key, rest in final if key == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    entry = [rest for key, rest in final if key == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    argv = json.loads(entry[-1])  # exec form: signals reach python, arguments pass through
    assert argv[-1] == "/opt/qsmrim/run.py"
    assert argv[0].startswith("/") and "python3" in argv[0]
    builder_runs = " ".join(rest for key, rest in stages[0] if key == "RUN")
    assert "run.py /opt/qsmrim/" in builder_runs and "version" in builder_runs
    assert (REPO / "run.py").is_file() and (REPO / "version").is_file()


def _dockerignore_allows(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, '!' re-includes."""
    import fnmatch

    allowed = True
    for pat in patterns:
        negate = pat.startswith("!")
        core = pat[1:] if negate else pat
        core = core.rstrip("/")
        hit = core == "**" or fnmatch.fnmatch(rel, core) or fnmatch.fnmatch(rel, core + "/*") \
            or rel.startswith(core + "/")
        if hit:
            allowed = negate
    return allowed


def test_build_context_holds_exactly_what_copy_needs(dockerfile) -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    _, stages = dockerfile
    sources: list[str] = []
    for stage in stages:
        for key, rest in stage:
            if key == "COPY" and not rest.startswith("--from="):
                sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY source {src} missing from the repo"
        assert _dockerignore_allows(src, patterns), f"COPY source {src} excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "work/x", "example/bids"):
        assert not _dockerignore_allows(heavy, patterns), f"{heavy} would enter the build context"


def test_apptainer_definition() -> None:
    text = (REPO / "apptainer.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, flags=re.M))
    assert header.get("Bootstrap") in ("docker-daemon", "localimage", "docker-archive", "docker")
    assert header.get("From", "").startswith("qsmrim:")
    sections = set(re.findall(r"^%(\w+)", text, flags=re.M))
    assert {"runscript", "labels", "test"} <= sections
    runscript = text.split("%runscript", 1)[1].split("\n%", 1)[0]
    assert re.search(r'exec /opt/venv/bin/python3 /opt/qsmrim/run.py "\$@"', runscript)
    assert "--nv" in text, "the usage notes must show how to pass the GPU"


# ---------------------------------------------------------------------------------------------------------
# scripts/compare_derivatives.py: what the container and SLURM stages rely on to call two runs "the same".
def _write_tree(root: Path, rng: np.random.Generator, *, bump: float = 0.0, container: str = "venv") -> None:
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    data = rng.standard_normal((8, 8, 4)).astype(np.float32)
    data[0, 0, 0] += bump
    nib.save(nib.Nifti1Image(data, affine), str(anat / "sub-01_space-qsm_desc-qsm_Chimap.nii.gz"))
    (anat / "sub-01_desc-lesions_table.tsv").write_text(
        "lesion_id\tvoxels\tprob_rimpos\tlabel\n1\t12\t0.25\trim-\n2\t40\tn/a\trim+\n")
    np.savez(anat / "sub-01_desc-patches.npz", patches=data[None], lesion_id=np.array([1], np.int32))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "qsmrim", "GeneratedBy": [{"Name": "qsmrim", "Container": {"Tag": container}}],
         "DatasetLinks": {"raw": f"file:///{len(container)}"}, "SourceDatasets": [{"URL": container}]}))
    (root / "logs").mkdir()
    (root / "logs" / f"run-{len(container)}.log").write_text(container)


def test_compare_identical_trees_despite_run_specific_fields(tmp_path: Path) -> None:
    _write_tree(tmp_path / "a", np.random.default_rng(0), container="venv")
    _write_tree(tmp_path / "b", np.random.default_rng(0), container="docker://qsmrim:0.1.0")
    problems, n = cd.compare_trees(tmp_path / "a", tmp_path / "b")
    assert problems == [] and n == 4
    assert cd.main([str(tmp_path / "a"), str(tmp_path / "b"), "--min-files", "4"]) == 0
    assert cd.main([str(tmp_path / "a"), str(tmp_path / "b"), "--min-files", "5"]) == 1


def test_compare_finds_voxel_table_and_file_differences(tmp_path: Path) -> None:
    _write_tree(tmp_path / "a", np.random.default_rng(0))
    _write_tree(tmp_path / "b", np.random.default_rng(0), bump=1e-2)
    table = tmp_path / "b" / "sub-01" / "anat" / "sub-01_desc-lesions_table.tsv"
    table.write_text(table.read_text().replace("0.25", "0.26"))
    (tmp_path / "b" / "sub-01" / "anat" / "extra.json").write_text("{}")
    problems, _ = cd.compare_trees(tmp_path / "a", tmp_path / "b")
    text = "\n".join(problems)
    assert "Chimap.nii.gz: voxels differ" in text
    assert "patches.npz: array 'patches'" in text
    assert "column 'prob_rimpos'" in text
    assert "extra.json" in text
    assert cd.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_compare_tolerates_float_noise_below_tolerance(tmp_path: Path) -> None:
    _write_tree(tmp_path / "a", np.random.default_rng(1))
    _write_tree(tmp_path / "b", np.random.default_rng(1), bump=1e-8)
    assert cd.compare_trees(tmp_path / "a", tmp_path / "b")[0] == []


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QSMRIM_TEST_CONTAINER") != "1",
                    reason="builds and runs the podman image (minutes, root); set QSMRIM_TEST_CONTAINER=1")
def test_container_stage_end_to_end() -> None:
    """The CI stage itself: build, --version, compiler-free image, venv vs container outputs."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "container.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SKIP" not in proc.stdout, proc.stdout
    assert "PASS" in proc.stdout
