"""The chat page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against a gateway and a worker on the real
local stack. A screenshot is saved to .dev/artifacts/ for people to look at."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import trio

from tests.helpers import ROOT, gateway_running, worker_running
from tests.scripted_llm import Reply

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = ROOT / ".dev" / "artifacts"
TOKENS = tuple(f"w{n} " for n in range(40))

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="not run: needs Debian's chromium and chromium-driver (bin/chat-actors test "
           "installs them when it runs as root)")


def _browser(profile: str):  # a selenium WebDriver
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager reach the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1100,800",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def _wait(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling the page's DOM: the browser signals nothing we can await
    raise AssertionError(f"timed out waiting for {what}")


def _session(url: str) -> None:
    """Sign in, ask, reload mid-answer, ask again and stop, reload: as a person would."""
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="chromium-")
    driver = _browser(profile)
    try:
        driver.get(url)
        driver.find_element(By.ID, "signin-button").click()
        _wait(lambda: driver.find_elements(By.ID, "message"), what="the chat form")
        _wait(lambda: "signed in" in driver.find_element(By.ID, "who").text, what="sign-in")
        driver.find_element(By.ID, "message").send_keys("Count for me")
        driver.find_element(By.ID, "send").click()

        def answer() -> str:
            boxes = driver.find_elements(By.CSS_SELECTOR, ".assistant .answer")
            return boxes[-1].text if boxes else ""

        _wait(lambda: len(answer().split()) >= 5, what="tokens to appear")
        driver.refresh()  # mid-answer: the page resumes from its last event id
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant[data-status]"),
              what="the resumed answer to finish")
        box = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        assert box.get_attribute("data-status") == "completed"
        expected = "".join(TOKENS).strip()
        assert (box.get_attribute("data-streamed") or "").strip() == expected  # no repeats
        assert answer().strip() == expected

        driver.find_element(By.ID, "message").send_keys("Count again")
        driver.find_element(By.ID, "send").click()
        _wait(lambda: answer().split(), what="the second answer to start")
        driver.find_element(By.ID, "stop").click()
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".assistant[data-status]")) >= 1
              and driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
              .get_attribute("data-status"), what="the stop to take effect")
        assert driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute(
            "data-status") == "cancelled"
        assert "cancelled" in driver.find_elements(By.CSS_SELECTOR, ".status")[-1].text

        driver.refresh()  # the past turns come back from the history
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".turn.user")) >= 2,
              what="the history after a reload")
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".turn.user")]
        assert users[:2] == ["Count for me", "Count again"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "gateway-page.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def test_a_person_chats_reloads_stops_and_sees_the_history(gw_config, llm):
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true")
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.12)
    async with worker_running(config), gateway_running(config) as (handle, _):
        await trio.to_thread.run_sync(_session, f"http://127.0.0.1:{handle.port}/")
    assert (ARTIFACTS / "gateway-page.png").stat().st_size > 1000


def _documents(url: str, document: Path) -> None:
    """Sign in, upload a document, ask from it and see its source, delete it."""
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="chromium-")
    driver = _browser(profile)
    try:
        driver.get(url)
        driver.find_element(By.ID, "signin-button").click()
        _wait(lambda: "signed in" in driver.find_element(By.ID, "who").text, what="sign-in")
        driver.find_element(By.ID, "upload").send_keys(str(document))
        _wait(lambda: "chunks" in driver.find_element(By.ID, "upload-status").text,
              what="the upload")
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".document span")]
        assert names == [document.name]
        assert driver.find_element(By.ID, "rag").is_selected()  # asks use the documents now
        driver.find_element(By.ID, "message").send_keys("Where is the boat moored?")
        driver.find_element(By.ID, "send").click()
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant[data-status]"),
              what="the answer")
        assert document.name in driver.find_elements(By.CSS_SELECTOR, ".sources")[-1].text
        driver.find_element(By.CSS_SELECTOR, ".document button").click()
        _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, ".document"),
              what="the document to go")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def test_a_person_uploads_a_document_asks_from_it_and_deletes_it(gw_config, llm,
                                                                       fresh_dsn, tmp_path):
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true",
                       CHAT_ACTORS__POSTGRES__DSN=fresh_dsn,
                       CHAT_ACTORS__RAG__PATH=str(tmp_path / "rag"))
    llm.default = Reply(tokens=("At", " pier", " nine", "."))
    document = tmp_path / "boats.md"
    document.write_text("# Boats\nThe boat Quelvath is moored at pier nine.\n")
    async with worker_running(config), gateway_running(config) as (handle, _):
        await trio.to_thread.run_sync(_documents, f"http://127.0.0.1:{handle.port}/", document)
