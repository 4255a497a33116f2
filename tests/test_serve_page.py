"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): one message
with its label, bars and tokens coloured by their attributions, a file of many with its table and CSV link, an
API error shown in words, and another classifier of the server picked from the list."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lorafit.adapters.lora import LoRAConfig  # noqa: E402
from lorafit.inference.explain import explain_texts  # noqa: E402
from lorafit.inference.predict import predict_texts  # noqa: E402
from serve_fixtures import TEXTS, start_server, write_adapter, write_tiny_run  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--window-size=1100,1250", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_page_classifies_one_message_and_a_file(tmp_path, browser):
    run = write_tiny_run(tmp_path)
    topic = write_adapter(tmp_path / "base", tmp_path / "topic", ["sport", "news", "tech", "food"], LoRAConfig(rank=2),
                          seed=5)
    tags = multi_label_run(tmp_path / "base", tmp_path / "tags")
    pairs = pair_run(tmp_path / "base", tmp_path / "pairs")
    reference = {r["text"]: r for r in predict_texts(run, TEXTS, device="cpu", precision="fp32")}
    proc, url = start_server(run, "--run", f"topic={topic}", "--run", f"tags={tags}", "--run", f"pairs={pairs}")
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(url)
        wait.until(lambda d: "classes ham, spam, unsure" in d.find_element(By.ID, "model-info").text)

        browser.find_element(By.ID, "text").send_keys(TEXTS[0])
        browser.find_element(By.ID, "classify").click()
        wait.until(ec.visibility_of_element_located((By.ID, "result")))
        expected = reference[TEXTS[0]]
        assert browser.find_element(By.ID, "label").text == expected["label"]
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
        shown = {b.get_attribute("data-label"): b.find_element(By.CLASS_NAME, "bar-value").text for b in bars}
        assert shown == {k: f"{100 * p:.1f} %" for k, p in expected["probabilities"].items()}
        assert "answered in" in browser.find_element(By.ID, "latency").text
        wait.until(lambda d: d.find_element(By.ID, "why-status").text.startswith("Why "))  # POST /explain's answer
        explained = explain_texts(run, [TEXTS[0]], device="cpu", precision="fp32")[0]
        spans = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
        assert [s.get_attribute("textContent") for s in spans] == explained.tokens
        assert [float(s.get_attribute("data-attribution")) for s in spans] == pytest.approx(explained.attributions,
                                                                                             abs=1e-4)
        assert explained.method in browser.find_element(By.ID, "why-status").text

        upload = tmp_path / "messages.csv"
        upload.write_text('id,text\n1,"%s"\n2,%s\n3,"%s"\n' % (TEXTS[4], TEXTS[1], TEXTS[3]), encoding="utf-8")
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-body tr")) == 3)
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in browser.find_elements(By.CSS_SELECTOR, "#batch-body tr")]
        for row, text in zip(rows, (TEXTS[4], TEXTS[1], TEXTS[3])):
            assert row[1] == text and row[2] == reference[text]["label"]
            assert row[3:] == [f"{reference[text]['probabilities'][k]:.4f}" for k in ("ham", "spam", "unsure")]
        assert browser.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
        browser.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("LORAFIT_SCREENSHOT"):  # how docs/serve.png was made
            browser.save_screenshot(os.environ["LORAFIT_SCREENSHOT"])
        assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        browser.find_element(By.ID, "text").clear()
        browser.find_element(By.ID, "text").send_keys("   ")
        browser.find_element(By.ID, "classify").click()
        wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert browser.find_element(By.ID, "error").text == "The request was refused: inputs is an empty string"

        Select(browser.find_element(By.ID, "model")).select_by_visible_text("topic")
        wait.until(lambda d: "Classifier topic" in d.find_element(By.ID, "model-info").text)
        assert "classes sport, news, tech, food" in browser.find_element(By.ID, "model-info").text
        browser.find_element(By.ID, "text").clear()
        browser.find_element(By.ID, "text").send_keys(TEXTS[4])
        browser.find_element(By.ID, "classify").click()
        wait.until(ec.visibility_of_element_located((By.ID, "result")))
        expected = predict_texts(topic, [TEXTS[4]], device="cpu", precision="fp32")[0]
        assert browser.find_element(By.ID, "label").text == expected["label"]
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
        shown = {b.get_attribute("data-label"): b.find_element(By.CLASS_NAME, "bar-value").text for b in bars}
        assert shown == {k: f"{100 * p:.1f} %" for k, p in expected["probabilities"].items()}
        check_multi_label(browser, wait, tags, tmp_path)
        check_pairs(browser, wait, pairs, tmp_path)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def pair_run(base, out):
    """An adapter that reads pairs of texts (question, answer), joined as GPT-2 joins them."""
    from dataclasses import replace

    from lorafit.adapters.storage import read_spec, save_spec
    from lorafit.backbones.pairs import PairJoin

    write_adapter(base, out, ["diff", "same"], LoRAConfig(rank=2), seed=9)
    save_spec(out, replace(read_spec(out), text_pair=PairJoin("sep", "<|endoftext|>", ("question", "answer"))))
    return out


def check_pairs(browser, wait, run, tmp_path) -> None:
    """A pair classifier: a second text box, both texts sent as one pair; a CSV's two columns as the batch."""
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("pairs")
    wait.until(lambda d: "Classifier pairs" in d.find_element(By.ID, "model-info").text)
    assert browser.find_element(By.ID, "pair-row").is_displayed()
    assert browser.find_element(By.ID, "pair-label").text == "Second text (answer)"
    expected = predict_texts(run, [(TEXTS[0], TEXTS[1])], device="cpu", precision="fp32")[0]
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(TEXTS[0])
    browser.find_element(By.ID, "text-pair").send_keys(TEXTS[1])
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: d.find_element(By.ID, "label").text == expected["label"])
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert {b.get_attribute("data-label"): b.find_element(By.CLASS_NAME, "bar-value").text for b in bars} == \
        {k: f"{100 * p:.1f} %" for k, p in expected["probabilities"].items()}
    upload = tmp_path / "pairs.csv"
    upload.write_text(f'answer,question\n"{TEXTS[1]}","{TEXTS[0]}"\n"{TEXTS[3]}","{TEXTS[2]}"\n', encoding="utf-8")
    browser.find_element(By.ID, "file").send_keys(str(upload))
    # the table is rebuilt when the answer comes: a row read while it is replaced is stale, so look again
    WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-body tr")) == 2
        and d.find_element(By.CSS_SELECTOR, "#batch-body tr td:nth-child(3)").text == TEXTS[1])
    reference = predict_texts(run, [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3])], device="cpu", precision="fp32")
    for tr, ref in zip(browser.find_elements(By.CSS_SELECTOR, "#batch-body tr"), reference):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        assert cells[1:4] == [ref["text"], ref["text_pair"], ref["label"]]


def multi_label_run(base, out):
    """A multi-label adapter of three labels whose thresholds put TEXTS[1]'s first label over, its second under,
    and leave the third at 0.5."""
    from dataclasses import replace

    from lorafit.adapters.storage import read_spec, save_spec

    write_adapter(base, out, ["late", "money", "urgent"], LoRAConfig(rank=2), seed=7)
    save_spec(out, replace(read_spec(out), multi_label=True))
    p = predict_texts(out, [TEXTS[1]], device="cpu", precision="fp32")[0]["probabilities"]
    save_spec(out, replace(read_spec(out), thresholds={"late": p["late"] / 2, "money": (p["money"] + 1) / 2}))
    return out


def check_multi_label(browser, wait, run, tmp_path) -> None:
    """Every label of a multi-label run with its score, its threshold and whether it passes; the label line
    and the batch table give every label over its threshold."""
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("tags")
    wait.until(lambda d: "Classifier tags" in d.find_element(By.ID, "model-info").text)
    assert "every label whose probability reaches its threshold" in browser.find_element(By.ID, "model-info").text
    expected = predict_texts(run, [TEXTS[1]], device="cpu", precision="fp32")[0]
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(TEXTS[1])
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: d.find_element(By.ID, "label-name").text == "Labels")
    assert browser.find_element(By.ID, "label").text == (" | ".join(expected["labels"]) or "(none)")
    rows = {b.get_attribute("data-label"): b for b in browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")}
    assert set(rows) == {"late", "money", "urgent"}
    for name, row in rows.items():
        p, t = expected["probabilities"][name], expected["thresholds"][name]
        assert row.find_element(By.CLASS_NAME, "bar-value").text == f"{100 * p:.1f} %"
        assert row.get_attribute("data-passes") == str(p >= t).lower()
        assert row.find_element(By.CLASS_NAME, "bar-verdict").text == ("✓ ≥ " if p >= t else "✗ < ") + f"{100 * t:.1f} %"
    assert rows["late"].get_attribute("data-passes") == "true" and rows["money"].get_attribute("data-passes") == "false"
    assert browser.find_element(By.ID, "why-status").text == "Token explanations are for single-label classifiers."
    upload = tmp_path / "tags.txt"
    upload.write_text(f"{TEXTS[1]}\n{TEXTS[0]}\n", encoding="utf-8")
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-body tr")) == 2
               and d.find_element(By.CSS_SELECTOR, "#batch-body tr td:nth-child(2)").text == TEXTS[1])
    for tr, text in zip(browser.find_elements(By.CSS_SELECTOR, "#batch-body tr"), (TEXTS[1], TEXTS[0])):
        labels = predict_texts(run, [text], device="cpu", precision="fp32")[0]["labels"]
        assert tr.find_elements(By.TAG_NAME, "td")[2].text == (" | ".join(labels) or "(none)")
