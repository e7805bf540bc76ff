"""Lesion matching across sessions (tracks.py) on constructed lesion maps whose answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qsmrim_app import tracks as trk
from qsmrim_app.model.counts import count_interval, poisson_binomial_pmf

SHAPE = (40, 40, 40)


def ball(centre, radius, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return np.sum((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2, axis=0) <= radius ** 2


def labels(*balls) -> np.ndarray:
    out = np.zeros(SHAPE, np.int32)
    for lid, mask in balls:
        out[mask & (out == 0)] = lid
    return out


def table(lab: np.ndarray, probs: dict[int, float], threshold: float = 0.5, spread: float = 0.05) -> pd.DataFrame:
    ids = sorted(int(i) for i in np.unique(lab) if i)
    return pd.DataFrame({"lesion_id": ids, "volume_mm3": [float((lab == i).sum()) for i in ids],
                         "probability": [probs.get(i, 0.1) for i in ids], "uncertainty": spread,
                         "threshold": threshold, "rim_positive": [int(probs.get(i, 0.1) >= threshold) for i in ids]})


def tracks_of(assignments: pd.DataFrame) -> dict[tuple[str, int], int]:
    return {(r.session, int(r.lesion_id)): int(r.track_id) for r in assignments.itertuples()}


def test_split_merge_new_gone_and_shift_on_constructed_maps():
    s1 = labels((1, ball((10, 10, 10), 4)),                        # stays, shifted 2 voxels
                (2, ball((28, 12, 12), 5)),                        # splits in two
                (3, ball((10, 28, 28), 3)),                        # gone in session 2
                (4, ball((26, 28, 24), 3)), (5, ball((26, 28, 32), 3)))  # two that merge
    s2 = labels((1, ball((12, 10, 10), 4)),
                (2, ball((28, 10, 12), 3)), (3, ball((28, 16, 12), 3)),
                (4, ball((26, 28, 28), 6)),
                (5, ball((30, 32, 4), 3)))                         # new
    a = trk.match_sessions([trk.SessionLesions("01", s1, table(s1, {})), trk.SessionLesions("02", s2, table(s2, {}))])
    t = tracks_of(a)
    assert t[("01", 1)] == t[("02", 1)]
    assert t[("01", 2)] == t[("02", 2)] == t[("02", 3)]           # split
    assert t[("01", 4)] == t[("01", 5)] == t[("02", 4)]           # merge
    assert t[("01", 3)] not in {t[("02", k)] for k in range(1, 6)}  # no longer seen
    assert t[("02", 5)] not in {t[("01", k)] for k in range(1, 6)}  # new
    # numbered by first session, then lesion id there; the new lesion comes last
    assert [t[("01", k)] for k in (1, 2, 3, 4)] == [1, 2, 3, 4] and t[("02", 5)] == 5


def test_touching_neighbour_is_not_merged_and_small_shift_without_overlap_links():
    # two confluent lesions drawn larger in session 2: each still overlaps its neighbour a little
    s1 = labels((1, ball((20, 20, 14), 5)), (2, ball((20, 20, 24), 5)), (3, ball((8, 8, 8), 1.5)))
    s2 = labels((1, ball((20, 20, 14), 6.5)), (2, ball((20, 20, 24), 6.5)), (3, ball((8, 8, 11), 1.5)))
    assert (np.isin(s2, [1]) & (s1 == 2)).any()  # the neighbour really is overlapped
    links = trk.pair_links(s1, s2, voxel_mm=1.0, min_overlap=0.2, shift_mm=3.0)
    assert links == {(1, 1), (2, 2), (3, 3)}
    # beyond the shift tolerance the small lesion counts as gone + new
    assert (3, 3) not in trk.pair_links(s1, s2, voxel_mm=1.0, shift_mm=2.0)


def test_track_ids_do_not_depend_on_session_or_lesion_order_given():
    s1 = labels((1, ball((10, 10, 10), 4)), (2, ball((28, 28, 28), 4)))
    s2 = labels((1, ball((28, 28, 28), 4)), (2, ball((10, 10, 10), 4)))  # numbered the other way round
    sessions = [trk.SessionLesions("01", s1, table(s1, {})), trk.SessionLesions("02", s2, table(s2, {}))]
    first = trk.match_sessions(sessions)
    again = trk.match_sessions(sessions)
    pd.testing.assert_frame_equal(first, again)
    t = tracks_of(first)
    assert t[("01", 1)] == t[("02", 2)] == 1 and t[("01", 2)] == t[("02", 1)] == 2


@pytest.mark.parametrize("calls, near, expected", [
    ([1, 1, 1], [], "persistent rim+"),
    ([0, 1, 1], [], "new rim+"),
    ([None, 0, 1], [], "new rim+"),
    ([1, 0, 0], [], "resolved"),
    ([1, 1, None], [], "resolved"),
    ([0, 0, None], [], "rim- throughout"),
    ([1, 0, 1], [], "uncertain"),
    ([0, 1, 0], [], "uncertain"),
    ([1, 1], [True], "uncertain"),
])
def test_status_rules(calls, near, expected):
    assert trk.status(calls, near) == expected


def test_track_table_statuses_volumes_and_probabilities():
    s1 = labels((1, ball((10, 10, 10), 4)), (2, ball((28, 28, 28), 4)), (3, ball((10, 30, 10), 3)))
    s2 = labels((1, ball((10, 10, 10), 5)), (2, ball((28, 28, 28), 4)), (3, ball((30, 8, 30), 3)))
    t1, t2 = table(s1, {1: 0.9, 2: 0.8}), table(s2, {1: 0.95, 2: 0.2, 3: 0.9})
    sessions = [trk.SessionLesions("01", s1, t1), trk.SessionLesions("02", s2, t2)]
    tracks = trk.track_table(trk.match_sessions(sessions), {"01": t1, "02": t2}, ["01", "02"]).set_index("track_id")
    assert tracks.loc[1, "status"] == "persistent rim+"
    assert tracks.loc[2, "status"] == "resolved"
    assert tracks.loc[3, "status"] == "rim- throughout"  # seen in ses-01 only, rim-
    assert tracks.loc[4, "status"] == "new rim+"          # appears in ses-02 with a rim
    assert tracks.loc[1, "volume_change_mm3"] == (s2 == 1).sum() - (s1 == 1).sum() > 0
    assert tracks.loc[1, "probability_track"] == pytest.approx(0.925)
    assert tracks.loc[4, "p_new"] == pytest.approx(0.9) and tracks.loc[4, "p_persistent"] == 0.0
    assert pd.isna(tracks.loc[4, "lesion_id_ses-01"]) and tracks.loc[4, "lesion_id_ses-02"] == "3"
    counts = trk.participant_counts(tracks.reset_index())
    assert (counts["n_persistent"], counts["n_new"], counts["n_resolved"], counts["n_rimneg"]) == (1, 1, 1, 1)
    assert counts["persistent_ci_low"] <= 1 <= counts["persistent_ci_high"]


def test_poisson_binomial_matches_the_binomial_and_its_interval():
    from scipy import stats

    p = np.full(20, 0.3)
    np.testing.assert_allclose(poisson_binomial_pmf(p), stats.binom.pmf(np.arange(21), 20, 0.3), atol=1e-12)
    expected, low, high = count_interval(p)
    assert expected == pytest.approx(6.0)
    assert (low, high) == (int(stats.binom.ppf(0.025, 20, 0.3)), int(stats.binom.ppf(0.975, 20, 0.3)))
    assert count_interval(np.array([])) == (0.0, 0, 0)
    assert count_interval(np.array([1.0, 1.0, 0.0]))[1:] == (2, 2)
