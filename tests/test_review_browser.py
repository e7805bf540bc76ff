"""The rater's loop as a rater runs it: participant level, review in a real browser, retrain on the decisions.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed by ``.ci/run``) opens the
URL that ``qsmrim-review`` prints, and every decision is made with the keyboard. The test then checks
the review dataset, runs the participant level with ``--rim-annotations`` on it and trains on the
decided lesions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app import derivatives as drv

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def run_app(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def tree_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt pins it)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 60.0, what: str = "the page"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def review_server(out: Path, review: Path):
    """``qsmrim-review`` as a user starts it; yields the URL it prints."""
    server = subprocess.Popen([sys.executable, "-m", "qsmrim_app.review", str(out), "--review-dir", str(review),
                               "--rater", "tester"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = server.stdout.readline()
        assert line.startswith("qsmrim-review: open http://127.0.0.1:"), line + server.stderr.read()
        yield line.split("open ", 1)[1].strip()
    finally:
        server.terminate()
        server.wait(30)


def review_with_keyboard(browser, url: str, units: list[str], shot: Path) -> dict[tuple[str, int], str]:
    """Decide at least one rim+ and one rim- per unit ('sub-X|ses'), an unsure, then clear it; keys only.

    Returns {(unit, lesion_id): decision} of what stands.
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url.split("?")[0])  # without the token: refused
    assert "403" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(url)
    body = browser.find_element(By.TAG_NAME, "body")
    wait_for(lambda: body.get_attribute("data-current"), what="the first lesion")
    wait_for(lambda: browser.execute_script(
        "return [...document.querySelectorAll('#views img')].every(i => i.complete && i.naturalWidth === 256)"),
        what="the six views")
    assert browser.find_element(By.ID, "progress").text.startswith("0 of")
    keys = ActionChains(browser)
    made: dict[tuple[str, int], str] = {}

    def where() -> tuple[str, int]:
        participant, session, lesion = body.get_attribute("data-current").split("|")
        return f"{participant}|{session}", int(lesion)

    def press(key: str) -> None:
        keys.send_keys(key).perform()

    def decide(key: str, decision: str | None) -> None:
        lesion = where()
        saves = int(body.get_attribute("data-saves") or 0)
        press(key)
        wait_for(lambda: int(body.get_attribute("data-saves") or 0) > saves, what=f"saving {decision}")
        if decision is None:
            del made[lesion]
        else:
            made[lesion] = decision

    wanted = {unit: {"rimpos", "rimneg"} for unit in units}
    for _ in range(80):
        if not any(wanted.values()):
            break
        unit, _ = where()
        if "rimpos" in wanted[unit]:
            decide("1", "rimpos")  # the page moves on to the next lesion by itself
            wanted[unit].discard("rimpos")
        elif "rimneg" in wanted[unit]:
            decide("2", "rimneg")
            wanted[unit].discard("rimneg")
        else:
            before = where()
            press(Keys.ARROW_RIGHT)
            wait_for(lambda: where() != before, what="the next lesion")
    assert not any(wanted.values()), wanted
    target = next(iter(made))  # back to the first lesion decided (the queue's first: not its last)
    for _ in range(80):
        if where() == target:
            break
        before = where()
        press(Keys.ARROW_LEFT)
        wait_for(lambda: where() != before, what="the previous lesion")
    original = made[target]
    decide("3", "unsure")  # change our mind (the page moves on), come back, clear it, decide again
    press(Keys.ARROW_LEFT)
    wait_for(lambda: where() == target, what="the previous lesion")
    decide("0", None)
    assert where() == target  # clearing does not move on
    decide({"rimpos": "1", "rimneg": "2"}[original], original)
    press("o")  # the outline toggle re-requests the views without it
    wait_for(lambda: "outline=0" in browser.find_element(By.ID, "img-qsm-axial").get_attribute("src"),
             what="views without outline")
    n_pos = sum(d == "rimpos" for d in made.values())
    progress = browser.find_element(By.ID, "progress").text
    assert progress.startswith(f"{len(made)} of ") and f"{n_pos} rim+ so far" in progress, progress
    browser.save_screenshot(str(shot))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "403" not in e["message"]]
    assert not errors, errors
    return made


def check_review_files(out: Path, review: Path, made: dict[tuple[str, int], str], units: list[str]) -> None:
    """The decisions tables and the majority dseg images say what was decided, on the lesions' grid."""
    assert (review / "dataset_description.json").is_file()
    for name in units:
        participant, session = name.split("|")
        unit = drv.Unit(participant[4:], session or None)
        table = drv.read_tsv(drv.review_path(review, unit, "rim_decisions"))
        mine = {lesion: d for (u, lesion), d in made.items() if u == name}
        assert dict(zip(table["lesion_id"], table["decision"])) == mine
        assert set(table["rater"]) == {"tester"}
        rim = drv.read_tsv(drv.output_path(out, unit, "rim_lesions")).set_index("lesion_id")["probability"]
        assert np.allclose(table["probability"], rim.loc[table["lesion_id"]].to_numpy())
        lesions = np.asarray(nib.load(drv.output_path(out, unit, "lesions_dseg")).dataobj)
        dseg = np.asarray(nib.load(drv.review_path(review, unit, "rim_dseg")).dataobj)
        expected = np.zeros(int(lesions.max()) + 1, np.uint8)
        for lesion, decision in mine.items():
            expected[lesion] = {"rimpos": 2, "rimneg": 1}.get(decision, 0)
        assert np.array_equal(dseg, expected[lesions])


def test_keyboard_review_in_the_browser(browser, tmp_path):
    """The page on small hand-made outputs (no pipeline run): seconds, with sessions."""
    from test_review import make_outputs

    bids, out = make_outputs(tmp_path)
    before = tree_digest(bids), tree_digest(out)
    units = ["sub-01|", "sub-02|1"]
    with review_server(out, tmp_path / "review") as url:
        made = review_with_keyboard(browser, url, units, tmp_path / "review.png")
    check_review_files(out, tmp_path / "review", made, units)
    assert (tree_digest(bids), tree_digest(out)) == before


@pytest.mark.slow
def test_review_in_the_browser_then_retrain(browser, tmp_path):
    from qsmrim_app.synthetic import generate_dataset

    bids, out, review = tmp_path / "bids", tmp_path / "out", tmp_path / "review"
    generate_dataset(bids, n_subjects=2, seed=5, rimplus_fraction=0.3)
    run_app(bids, out, "participant", "--nprocs", "2", "-w", tmp_path / "work")  # the bundled model classifies
    raw_before = tree_digest(bids)
    units = ["sub-01|", "sub-02|"]
    with review_server(out, review) as url:
        made = review_with_keyboard(browser, url, units, tmp_path / "review.png")
    check_review_files(out, review, made, units)
    assert tree_digest(bids) == raw_before, "the review wrote into the input dataset"

    # The decisions become training labels: participant level with --rim-annotations, then train.
    proc = run_app(bids, out, "participant", "--nprocs", "2", "-w", tmp_path / "work", "--rim-annotations", review)
    n_decided = 0
    for participant in ("01", "02"):
        unit = drv.Unit(participant)
        labels = drv.read_tsv(drv.output_path(out, unit, "annotations")).set_index("lesion_id")["rim_positive"]
        mine = {lesion: d for (u, lesion), d in made.items() if u == f"sub-{participant}|" and d != "unsure"}
        assert labels.dropna().astype(int).to_dict() == {k: int(d == "rimpos") for k, d in mine.items()}
        n_decided += len(mine)
    proc = run_app(bids, out, "group", "--train", "--folds", "2", "--seeds", "1", "--width-multiplier", "0.125",
                   "--epochs", "1")
    assert f"{n_decided} lesion(s) with a rim decision used for training" in proc.stderr
    (model,) = (out / "models").glob("*/model.json")
    assert json.loads(model.read_text())["training_data"]["lesions"] == n_decided
