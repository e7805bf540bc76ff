"""Physical-space lesion patches across grids, references, input levels, radial features, the .npz contract."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app.lesions import label_instances
from qsmrim_app.model.inputs import InputSpec
from qsmrim_app.patches import (PatchGrid, extract_patches, load_patches, normalise_flair, save_patches,
                                signed_distance_mm)
from qsmrim_app.radial import feature_names, radial_features, shell_minus_core_ppb
from qsmrim_app.reference import local_references

GRIDS = {"paper": (0.75, 0.75, 3.0), "iso1": (1.0, 1.0, 1.0), "fine": (0.6, 0.6, 2.0)}
CENTRE = np.array([1.3, -0.7, 2.1])  # off any voxel centre


def world_grid(voxel, fov_mm=(64.0, 64.0, 56.0), rotate_deg: float = 0.0):
    """Voxel-centre world coordinates (X, Y, Z, 3) and the affine of a grid; optionally rotated about z."""
    voxel = np.asarray(voxel, float)
    n = np.round(np.asarray(fov_mm) / voxel).astype(int)
    a = np.deg2rad(rotate_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(voxel)
    affine[:3, 3] = -affine[:3, :3] @ ((n - 1) / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3], affine


def _continuous(rel: np.ndarray, xyz: np.ndarray, rim: str) -> tuple[np.ndarray, np.ndarray]:
    """Susceptibility (ppb) and lesion indicator of the continuous object at points ``xyz``."""
    r = np.sqrt(((rel / np.array([5.0, 4.0, 6.0])) ** 2).sum(-1))
    qsm = 10.0 + 3.0 * np.sin(xyz[..., 0] / 7.0) + 2.0 * np.cos(xyz[..., 1] / 9.0)
    shell = np.exp(-((r - 1.0) / 0.15) ** 2)  # ~1.5 mm thick, as real rims
    if rim == "full":
        qsm = qsm + 60.0 * shell
    elif rim == "outside":
        qsm = qsm + 60.0 * np.exp(-((r - 1.2) / 0.12) ** 2)
    elif rim == "partial":
        qsm = qsm + 60.0 * shell * (np.arctan2(rel[..., 1], rel[..., 0]) > np.pi / 3)
    elif rim == "vein":
        d = np.sqrt((rel[..., 0] - 5.5) ** 2 + rel[..., 1] ** 2)  # a tube along z touching the +x edge
        qsm = qsm + 120.0 * np.exp(-(d / 0.7) ** 2)
    return qsm, (r <= 1.0).astype(np.float64)


def phantom(voxel, rim: str = "full", rotate_deg: float = 0.0, scale: float = 1.0, offset: float = 0.0,
            noise: float = 0.0, seed: int = 0):
    """One continuous ellipsoidal lesion (radii 5, 4, 6 mm) imaged on a grid, with a smooth background.

    Each voxel is the mean of the object over the voxel (3x3x3 sub-samples: partial volume, as a scanner
    integrates), so thin rims blur on thick slices as they do in real QSM. ``rim``: 'full' (a
    paramagnetic shell on the edge), 'outside' (the shell ~1 mm outside the mask), 'partial' (a third of
    the edge), 'vein' (a thin bright tube touching one side), 'none'.
    """
    xyz, affine = world_grid(voxel, rotate_deg=rotate_deg)
    qsm = np.zeros(xyz.shape[:3])
    frac = np.zeros(xyz.shape[:3])
    subs = (np.arange(3) - 1) / 3.0
    for a in subs:
        for b in subs:
            for c in subs:
                pts = xyz + affine[:3, :3] @ np.array([a, b, c])
                q, f = _continuous(pts - CENTRE, pts, rim)
                qsm += q / 27
                frac += f / 27
    if noise:
        qsm += np.random.default_rng(seed).normal(0, noise, qsm.shape)
    inst = (frac >= 0.5).astype(np.int32)
    flair = 3.0 * frac + 0.1 * np.sin(xyz[..., 2] / 5.0)
    return (scale * qsm + offset).astype(np.float32), flair.astype(np.float32), inst, affine, voxel


def patch_of(qsm, flair, inst, affine, voxel):
    ps = extract_patches(qsm, flair, inst, [1], affine)
    ref, _ = local_references(qsm, inst, np.ones(inst.shape, bool), [1], voxel)
    return ps, ref


def test_grid_shape_and_validation() -> None:
    assert PatchGrid().shape == (32, 32, 16)
    assert PatchGrid((20, 20, 20), (1, 1, 2)).shape == (20, 20, 10)
    with pytest.raises(ValueError, match="whole multiple"):
        PatchGrid((20, 20, 20), (0.75, 0.75, 1.5))
    with pytest.raises(ValueError):
        PatchGrid((24, 24, -1), (1, 1, 1))


def test_same_lesion_on_three_grids_gives_matching_patches() -> None:
    """One continuous lesion sampled on the paper's, a 1 mm and a 0.6x0.6x2 mm grid (and a rotated head)."""
    patches = {}
    for name, voxel in GRIDS.items():
        ps, ref = patch_of(*phantom(voxel)[:4], voxel)
        assert ps.patches.shape == (1, 4, 32, 32, 16) and ps.cropped == []
        patches[name] = (ps.patches[0], ref[0])
    ps, ref = patch_of(*phantom(GRIDS["iso1"], rotate_deg=25.0)[:4], GRIDS["iso1"])
    patches["rotated"] = (ps.patches[0], ref[0])
    a = patches["paper"][0]
    region = a[2] <= 3.0  # lesion and its 3 mm margin
    for name in ("iso1", "fine", "rotated"):
        b = patches[name][0]
        for channel in (0, 1, 2):
            r = np.corrcoef(a[channel][region], b[channel][region])[0, 1]
            assert r >= 0.9, (name, channel, r)
        inside_a, inside_b = a[2] < 0, b[2] < 0
        dice = 2 * (inside_a & inside_b).sum() / (inside_a.sum() + inside_b.sum())
        assert dice > 0.85, (name, dice)
    # The voxel-window alternative does not transfer: a 32x32x16 voxel window covers other extents.
    extents = {name: np.asarray((32, 32, 16)) * np.asarray(v) for name, v in GRIDS.items()}
    assert not np.allclose(extents["paper"], extents["iso1"])


def test_radial_features_agree_across_grids() -> None:
    values = {}
    for name, voxel in GRIDS.items():
        ps, ref = patch_of(*phantom(voxel)[:4], voxel)
        values[name] = radial_features(ps.patches[0], ref[0], ps.grid.spacing_mm)
    names = feature_names()
    # 3 mm slices blur a ~1.5 mm rim by partial volume (a physical ~20% loss of peak contrast), so the
    # intensities agree to 25% and the angular coverage, which does not depend on contrast, to 0.1.
    for key in ("radial_rim_peak", "radial_rim_minus_core"):
        j = names.index(key)
        vals = [values[n][j] for n in GRIDS]
        assert max(vals) - min(vals) <= 0.25 * max(abs(v) for v in vals), (key, vals)
    for key in ("radial_arc_fraction_max_k2", "radial_arc_fraction_mean_k2", "radial_sphere_fraction_k2"):
        j = names.index(key)
        vals = [values[n][j] for n in GRIDS]
        assert max(vals) - min(vals) <= 0.1, (key, vals)


def test_referenced_inputs_are_invariant_to_offset_and_scale() -> None:
    voxel = GRIDS["paper"]
    base = patch_of(*phantom(voxel, noise=2.0)[:4], voxel)
    other = patch_of(*phantom(voxel, noise=2.0, scale=0.6, offset=-35.0)[:4], voxel)
    ref_spec, abs_spec = InputSpec("referenced"), InputSpec("radial")
    x_base = ref_spec.network_inputs(base[0].patches, base[1])
    x_other = ref_spec.network_inputs(other[0].patches, other[1])
    np.testing.assert_allclose(x_base, x_other, atol=1e-3)
    spacing = base[0].grid.spacing_mm
    np.testing.assert_allclose(radial_features(base[0].patches[0], base[1][0], spacing),
                               radial_features(other[0].patches[0], other[1][0], spacing), atol=1e-3)
    # The absolute (unreferenced) inputs do change, which is what referencing buys.
    assert not np.allclose(abs_spec.network_inputs(base[0].patches, base[1]),
                           abs_spec.network_inputs(other[0].patches, other[1]), atol=1.0)
    # And so does the ppb floor score (it scales with the reconstruction).
    plain, scaled = phantom(voxel), phantom(voxel, scale=0.6)
    assert shell_minus_core_ppb(scaled[0], scaled[2], [1])[0] == pytest.approx(
        0.6 * shell_minus_core_ppb(plain[0], plain[2], [1])[0], rel=1e-4)


@pytest.mark.parametrize("voxel", [GRIDS["paper"], GRIDS["iso1"]])
def test_radial_features_on_constructed_rims(voxel) -> None:
    names = feature_names()

    def feats(rim: str) -> dict[str, float]:
        ps, ref = patch_of(*phantom(voxel, rim=rim, noise=1.0)[:4], voxel)
        return dict(zip(names, radial_features(ps.patches[0], ref[0], ps.grid.spacing_mm)))

    full, outside, partial, vein, none = (feats(k) for k in ("full", "outside", "partial", "vein", "none"))
    # A full rim: paramagnetic around the whole edge, on many slices (consensus: >= 2/3 on >= 2 slices).
    assert full["radial_arc_fraction_max_k2"] >= 0.9 and full["radial_arc_extent_mm_k2"] >= 3.0
    assert full["radial_rim_minus_core"] > 3.0
    # A rim just outside the (FLAIR) mask is still seen: the edge band reaches 2 mm out.
    assert outside["radial_arc_fraction_max_k2"] >= 0.9 and outside["radial_out0to1mm_mean"] > full["radial_in3to4mm_mean"]
    # A third of the edge is not a rim by the consensus rule.
    assert partial["radial_arc_fraction_max_k2"] <= 0.5
    assert partial["radial_arc_extent_mm_k2"] == 0.0
    # A vein touching one side is bright but covers little of the edge.
    assert vein["radial_arc_fraction_max_k2"] <= 0.4 and vein["radial_arc_extent_mm_k2"] == 0.0
    # No rim: nothing stands out from the reference tissue.
    assert none["radial_arc_fraction_max_k1"] <= 0.2 and abs(none["radial_rim_minus_core"]) < 1.0


def test_input_levels_mask_what_they_should() -> None:
    shape = (40, 40, 30)
    inst = np.zeros(shape, np.int32)
    inst[15:25, 15:25, 12:18] = 1
    inst[25:30, 15:25, 12:18] = 2  # a touching neighbour
    rng = np.random.default_rng(0)
    qsm = rng.normal(20, 5, shape).astype(np.float32)
    flair = rng.normal(0, 1, shape).astype(np.float32)
    ps = extract_patches(qsm, flair, inst, [1, 2], np.eye(4))
    ref = np.array([[20.0, 5.0], [20.0, 5.0]], np.float32)
    raw = ps.patches
    assert raw[0, 3].any() and not (raw[0, 3] * (raw[0, 2] < 0)).any()  # the neighbour, never this lesion
    paper = InputSpec("paper").network_inputs(raw, ref)
    assert paper.shape == (2, 2, 32, 32, 16)
    assert not paper[0][:, raw[0, 2] >= 0].any()  # the paper's patch: this lesion only
    margin = InputSpec("margin").network_inputs(raw, ref)
    assert margin.shape == (2, 3, 32, 32, 16)
    kept = margin[0, 0] != 0
    assert kept[(raw[0, 2] > 0) & (raw[0, 2] <= 3) & (raw[0, 3] == 0)].all()  # 3 mm of tissue kept
    assert not kept[raw[0, 3] > 0].any() and not kept[raw[0, 2] > 3.0].any()  # neighbour and far tissue not
    assert margin[0, 2].min() >= -1 and margin[0, 2].max() <= 1
    refd = InputSpec("referenced").network_inputs(raw, ref)
    inside = raw[0, 2] < 0
    np.testing.assert_allclose(refd[0, 0][inside], (raw[0, 0][inside] - 20.0) / 5.0, rtol=1e-5)


def test_reference_excludes_veins_and_lesions() -> None:
    shape = (50, 50, 20)
    rng = np.random.default_rng(3)
    qsm = rng.normal(-5.0, 4.0, shape).astype(np.float32)
    inst = np.zeros(shape, np.int32)
    inst[20:30, 20:30, 8:12] = 1
    qsm[inst > 0] = 80.0
    qsm[10:40, 33, :] = 300.0  # a vein 3 mm from the lesion
    ref, counts = local_references(qsm, inst, np.ones(shape, bool), [1], (1.0, 1.0, 3.0))
    assert counts[0] > 100
    assert ref[0, 0] == pytest.approx(-5.0, abs=0.7) and ref[0, 1] == pytest.approx(4.0, rel=0.2)


def test_signed_distance_is_in_mm() -> None:
    inside = np.zeros((20, 20, 10), bool)
    inside[5:15, 5:15, 3:7] = True
    sd = signed_distance_mm(inside, (0.5, 0.5, 2.0))
    assert sd[10, 10, 5] < 0 and sd[0, 10, 5] == pytest.approx(2.5)  # 5 voxels x 0.5 mm from the edge
    assert sd[10, 10, 9] == pytest.approx(6.0)  # 3 slices x 2 mm


def test_big_lesion_is_reported_as_cropped() -> None:
    shape = (60, 40, 30)
    inst = np.zeros(shape, np.int32)
    inst[5:55, 15:20, 10:15] = 3  # 50 mm long > 24 mm
    inst[30:33, 30:33, 5:8] = 4
    ps = extract_patches(np.ones(shape, np.float32), np.ones(shape, np.float32), inst, [3, 4], np.eye(4))
    assert ps.cropped == [3]


def test_unknown_lesion_and_shape_mismatch_raise() -> None:
    inst = np.zeros((20, 20, 20), np.int32)
    inst[5:8, 5:8, 5:8] = 1
    q = np.zeros(inst.shape, np.float32)
    with pytest.raises(ValueError, match="2"):
        extract_patches(q, q, inst, [2], np.eye(4))
    with pytest.raises(ValueError):
        extract_patches(q[:-1], q, inst, [1], np.eye(4))
    assert extract_patches(q, q, inst, [], np.eye(4)).patches.shape == (0, 4, 32, 32, 16)


def test_npz_round_trip_and_old_format_refused(tmp_path) -> None:
    qsm, flair, inst, affine, voxel = phantom(GRIDS["paper"])
    ps, ref = patch_of(qsm, flair, inst, affine, voxel)
    ps = type(ps)(ps.patches, ps.lesion_ids, ps.grid, ref, [])
    path = save_patches(tmp_path / "sub-01_desc-patches_lesions.npz", ps, voxel)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    back = load_patches(path)
    np.testing.assert_array_equal(back.patches, ps.patches)
    np.testing.assert_array_equal(back.reference, ref)
    assert back.grid == ps.grid and back.lesion_ids.tolist() == [1]
    old = tmp_path / "old.npz"
    np.savez(old, patches=np.zeros((1, 2, 32, 32, 16), np.float32), lesion_id=np.array([1], np.int32),
             voxel_size_mm=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="rerun the participant level"):
        load_patches(old)


def test_normalise_flair_robust_z_score() -> None:
    rng = np.random.default_rng(1)
    flair = rng.normal(300.0, 20.0, (30, 30, 30)).astype(np.float32)
    brain = np.zeros(flair.shape, dtype=bool)
    brain[3:27, 3:27, 3:27] = True
    flair[~brain] = 0.0
    lesions = np.zeros(flair.shape, dtype=np.int32)
    lesions[10:16, 10:16, 10:16] = 1
    flair[lesions > 0] = 900.0  # hyperintense lesions must not shift the reference
    out = normalise_flair(flair, brain, lesions)
    tissue = out[brain & (lesions == 0)]
    assert abs(np.median(tissue)) < 0.02
    assert np.subtract(*np.percentile(tissue, [75, 25])) / 1.349 == pytest.approx(1.0, abs=0.02)
    assert out[12, 12, 12] == pytest.approx((900 - 300) / 20, rel=0.05)
    assert normalise_flair(flair, None, None)[12, 12, 12] == pytest.approx(out[12, 12, 12], rel=0.1)


def test_real_flair_and_lesions(shared_data) -> None:
    folder = shared_data / "open_ms_data" / "patient07"
    flair_img = nib.load(folder / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")
    flair = np.asarray(flair_img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(folder / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz").dataobj)
    inst = label_instances(mask, min_voxels=10)
    norm = normalise_flair(flair, flair > 0, inst.labels)
    assert np.median(norm[inst.labels > 0]) > 1.0  # MS lesions are FLAIR-hyperintense
    ps = extract_patches(np.ones_like(flair), norm, inst.labels, inst.lesion_ids, flair_img.affine)
    assert ps.patches.shape[0] == len(inst.lesion_ids)
    sizes = np.bincount(inst.labels.ravel())
    for n, lesion_id in enumerate(inst.lesion_ids):
        inside = ps.patches[n, 2] < 0
        # Every lesion is in its patch, with about its own volume (1 mm voxels -> 0.84 mm^3 samples).
        volume = inside.sum() * np.prod(ps.grid.spacing_mm)
        if lesion_id not in ps.cropped:
            assert volume == pytest.approx(sizes[lesion_id], rel=0.5, abs=6.0), lesion_id
        assert np.median(ps.patches[n, 1][inside]) > 0.5  # the FLAIR hyperintensity is sampled


@pytest.mark.slow
def test_bundled_model_gives_the_same_probability_on_three_grids() -> None:
    """The bundled model, the full feature path (pyradiomics + radial features + patches) on one lesion per grid.

    The pyradiomics features are computed on each native grid (as the paper does), so they differ
    somewhat; the patches and radial features are physical. The model's probability must agree within 0.05.
    """
    from qsmrim_app.config import BUNDLED_MODEL_DIR, RADIOMICS_PARAMS
    from qsmrim_app.model.inputs import is_feature_column
    from qsmrim_app.model.predict import load_ensemble
    from qsmrim_app.radial import radial_table
    from qsmrim_app.radiomics import extract_lesion_features, load_params

    ens = load_ensemble(BUNDLED_MODEL_DIR, "cpu")
    params = load_params(RADIOMICS_PARAMS)
    for rim in ("full", "none"):
        probabilities = {}
        for name, voxel in GRIDS.items():
            qsm, flair, inst, affine, _ = phantom(voxel, rim=rim)
            ps, ref = patch_of(qsm, flair, inst, affine, voxel)
            table = extract_lesion_features(qsm, inst, voxel, [1], params)
            radial = radial_table(ps.patches, ref, ps.grid.spacing_mm)
            names = [c for c in table.columns if is_feature_column(c)] + feature_names() + ["shell_minus_core_ppb"]
            values = np.concatenate([table[[c for c in table.columns if is_feature_column(c)]].to_numpy(np.float32),
                                     radial, shell_minus_core_ppb(qsm, inst, [1])[None].astype(np.float32)], axis=1)
            probabilities[name] = float(ens.predict(ps.patches, values, names, reference=ref).probability[0])
        spread = max(probabilities.values()) - min(probabilities.values())
        assert spread <= 0.05, (rim, probabilities)


def test_tissue_level_first_order_features_are_invariant_to_offset_and_scale() -> None:
    """--inputs tissue: pyradiomics' first-order features (original and wavelet bands) referenced to the
    lesion's local tissue come out the same whatever the reconstruction's offset and scale."""
    from qsmrim_app.model.inputs import tissue_referenced_features
    from qsmrim_app.radiomics import extract_lesion_features, load_params

    voxel = GRIDS["paper"]
    rows, refs = [], []
    for kw in ({}, {"scale": 0.6, "offset": -35.0}):
        qsm, flair, inst, affine, _ = phantom(voxel, noise=2.0, **kw)
        rows.append(extract_lesion_features(qsm, inst, voxel, [1], load_params()).drop(columns="lesion_id"))
        refs.append(patch_of(qsm, flair, inst, affine, voxel)[1])
    names = list(rows[0].columns)
    moving = [j for j, n in enumerate(names) if "_firstorder_" in n and n.split("_firstorder_")[1] in (
        "Mean", "Median", "10Percentile", "90Percentile", "InterquartileRange", "MeanAbsoluteDeviation", "Variance")]
    assert len(moving) >= 9 * 7  # original + 8 wavelet bands
    absolute = [rows[k].to_numpy(np.float64)[:, moving] for k in (0, 1)]
    tissue = [tissue_referenced_features([names[j] for j in moving], absolute[k], refs[k]) for k in (0, 1)]
    assert not np.allclose(absolute[0], absolute[1], rtol=0.05, atol=0.05)
    spread = np.maximum(np.abs(tissue[0]), 0.05)
    assert np.max(np.abs(tissue[0] - tissue[1]) / spread) < 0.05, [names[j] for j in moving]
    # only the first-order statistics that move with offset/scale are touched
    untouched = [j for j, n in enumerate(names) if "_glcm_" in n or "_shape_" in n or n.endswith("Skewness")]
    values = rows[0].to_numpy(np.float32)
    np.testing.assert_array_equal(tissue_referenced_features(names, values, refs[0])[:, untouched], values[:, untouched])
    spec = InputSpec("tissue")
    assert spec.tissue_features and not InputSpec("referenced").tissue_features
    np.testing.assert_array_equal(InputSpec("referenced").feature_values(names, values, refs[0]), values)
