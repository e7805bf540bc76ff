"""The participant graph: one sub-workflow per stage, each with an inputnode/outputnode, memory estimates
on the nested nodes, and the lesion interface's is_instance_map passed on, not worked out again."""
from __future__ import annotations

from pathlib import Path

from qsmrim_app import derivatives as drv
from qsmrim_app.bids import discover
from qsmrim_app.config import AppConfig
from qsmrim_app.workflows.participant import init_participant_wf
from qsmrim_app.workflows.resources import NODE_MEMORY

STAGES = ("registration_wf", "lesions_wf", "features_wf", "classification_wf", "outputs_wf")


def _wf(phantom: Path, tmp_path: Path, classify: bool = True):
    config = AppConfig(bids_dir=phantom.resolve(), output_dir=(tmp_path / "out").resolve(),
                       analysis_level="participant", work_dir=(tmp_path / "work").resolve())
    inputs, problems = discover(config)
    assert not problems
    drv.staging_root(config.work_dir).mkdir(parents=True)  # as run_participants does before building
    return init_participant_wf(config, inputs[0], classify=classify)


def test_participant_wf_is_built_from_stage_sub_workflows(phantom: Path, tmp_path: Path) -> None:
    wf = _wf(phantom, tmp_path)
    names = wf.list_node_names()
    for stage in STAGES:
        assert any(n.startswith(stage + ".") for n in names), stage
    for stage in ("lesions_wf", "features_wf", "classification_wf", "outputs_wf"):
        assert f"{stage}.inputnode" in names
    for stage in ("registration_wf", "lesions_wf", "features_wf", "classification_wf"):
        assert f"{stage}.outputnode" in names
    # every node the memory table names got its estimator, wherever it sits
    estimated = [n for n in names if n.rsplit(".", 1)[-1] in NODE_MEMORY]
    assert len(estimated) >= 7
    assert all(wf.get_node(n).ram_estimator is not None for n in estimated)
    assert "outputs_wf.publish" in names


def test_preprocessing_only_has_no_classification(phantom: Path, tmp_path: Path) -> None:
    names = _wf(phantom, tmp_path, classify=False).list_node_names()
    assert not any(n.startswith("classification_wf.") for n in names)
    assert "outputs_wf.participant_report" not in names and "outputs_wf.ds_summary" not in names


def test_is_instance_map_comes_from_the_lesion_interface(phantom: Path, tmp_path: Path) -> None:
    wf = _wf(phantom, tmp_path)
    lesions_wf = wf.get_node("lesions_wf")
    if lesions_wf.get_node("lesion_split") is None:  # the phantom's mask is a rater's instance map
        assert lesions_wf.get_node("lesion_instances").inputs.is_instance_map is True
        return
    edges = lesions_wf._graph.get_edge_data(lesions_wf.get_node("lesion_split"), lesions_wf.get_node("lesion_instances"))
    assert ("is_instance_map", "is_instance_map") in edges["connect"]
