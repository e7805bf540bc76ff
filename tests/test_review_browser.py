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
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app import derivatives as drv

pytestmark = pytest.mark.slow
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


def test_review_in_the_browser_then_retrain(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from qsmrim_app.synthetic import generate_dataset

    bids, out, review = tmp_path / "bids", tmp_path / "out", tmp_path / "review"
    generate_dataset(bids, n_subjects=2, seed=5, rimplus_fraction=0.3)
    run_app(bids, out, "participant", "--nprocs", "2", "-w", tmp_path / "work")  # the bundled model classifies
    raw_before = tree_digest(bids)

    server = subprocess.Popen([sys.executable, "-m", "qsmrim_app.review", str(out), "--review-dir", str(review),
                               "--rater", "tester"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = server.stdout.readline()
        assert line.startswith("qsmrim-review: open http://127.0.0.1:"), line + server.stderr.read()
        url = line.split("open ", 1)[1].strip()
        browser.get(url.split("?")[0])  # without the token: refused
        assert "403" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(url)
        body = browser.find_element(By.TAG_NAME, "body")
        wait_for(lambda: body.get_attribute("data-current"), what="the first lesion")
        wait_for(lambda: all(browser.execute_script(
            "return [...document.querySelectorAll('#views img')].every(i => i.complete && i.naturalWidth === 256)")
            for _ in [0]), what="the six views")
        assert "0 of" in browser.find_element(By.ID, "progress").text

        keys = ActionChains(browser)
        made: dict[tuple[str, int], str] = {}

        def press(key: str) -> None:
            keys.send_keys(key).perform()

        def decide(key: str, decision: str) -> None:
            current = body.get_attribute("data-current")
            saves = int(body.get_attribute("data-saves") or 0)
            press(key)
            wait_for(lambda: int(body.get_attribute("data-saves") or 0) > saves, what=f"saving {decision}")
            participant, _, lesion = current.split("|")
            made[(participant, int(lesion))] = decision

        # At least one rim+ and one rim- per participant, with the keyboard only; skip the rest with ->.
        wanted = {p: {"rimpos", "rimneg"} for p in ("sub-01", "sub-02")}
        for _ in range(80):
            if not any(wanted.values()):
                break
            current = body.get_attribute("data-current")
            participant = current.split("|")[0]
            if "rimpos" in wanted[participant]:
                decide("1", "rimpos")  # advances to the next lesion by itself
                wanted[participant].discard("rimpos")
            elif "rimneg" in wanted[participant]:
                decide("2", "rimneg")
                wanted[participant].discard("rimneg")
            else:
                press(Keys.ARROW_RIGHT)
                wait_for(lambda: body.get_attribute("data-current") != current, what="the next lesion")
        assert not any(wanted.values()), wanted
        decide("3", "unsure")
        before = body.get_attribute("data-current")
        press(Keys.ARROW_LEFT)  # previous, then change our mind: clear with 0
        wait_for(lambda: body.get_attribute("data-current") != before, what="the previous lesion")
        participant, _, lesion = body.get_attribute("data-current").split("|")
        assert made[(participant, int(lesion))] == "unsure"
        saves = int(body.get_attribute("data-saves"))
        press("0")
        wait_for(lambda: int(body.get_attribute("data-saves")) > saves, what="clearing")
        del made[(participant, int(lesion))]
        press("o")  # the outline toggle re-requests the views without it
        wait_for(lambda: "outline=0" in browser.find_element(By.ID, "img-qsm-axial").get_attribute("src"),
                 what="views without outline")
        n_pos = sum(d == "rimpos" for d in made.values())
        assert browser.find_element(By.ID, "progress").text.startswith(f"{len(made)} of ")
        assert f"{n_pos} rim+ so far" in browser.find_element(By.ID, "progress").text
        browser.save_screenshot(str(tmp_path / "review.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "403" not in e["message"]]
        assert not errors, errors
    finally:
        server.terminate()
        server.wait(30)

    # The review dataset: the decisions table and the majority dseg on the lesions' grid.
    assert (review / "dataset_description.json").is_file()
    for participant in ("01", "02"):
        unit = drv.Unit(participant)
        table = drv.read_tsv(drv.review_path(review, unit, "rim_decisions"))
        mine = {lesion: d for (p, lesion), d in made.items() if p == unit.participant_id}
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
    assert tree_digest(bids) == raw_before, "the review wrote into the input dataset"

    # The decisions become training labels: participant level with --rim-annotations, then train.
    proc = run_app(bids, out, "participant", "--nprocs", "2", "-w", tmp_path / "work", "--rim-annotations", review)
    n_decided = 0
    for participant in ("01", "02"):
        unit = drv.Unit(participant)
        labels = drv.read_tsv(drv.output_path(out, unit, "annotations")).set_index("lesion_id")["rim_positive"]
        mine = {lesion: d for (p, lesion), d in made.items() if p == unit.participant_id and d != "unsure"}
        assert labels.dropna().astype(int).to_dict() == {k: int(d == "rimpos") for k, d in mine.items()}
        n_decided += len(mine)
    proc = run_app(bids, out, "group", "--train", "--folds", "2", "--seeds", "1", "--width-multiplier", "0.125",
                   "--epochs", "1")
    assert f"{n_decided} lesion(s) with a rim decision used for training" in proc.stderr
    (model,) = (out / "models").glob("*/model.json")
    assert json.loads(model.read_text())["training_data"]["lesions"] == n_decided
