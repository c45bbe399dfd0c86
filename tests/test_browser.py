"""The chat page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against a gateway and a worker on the real
local stack. A screenshot is saved to .dev/artifacts/ for people to look at."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import ROOT, gateway_running, until, worker_running
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


@contextmanager
def _signed_in(url: str) -> Iterator[Any]:
    """A headless browser on the page at `url`, signed in with the dev sign-in; closed
    when the block ends."""
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="chromium-")
    driver = _browser(profile)
    try:
        driver.get(url)
        driver.find_element(By.ID, "signin-button").click()
        _wait(lambda: driver.find_elements(By.ID, "message"), what="the chat form")
        _wait(lambda: "signed in" in driver.find_element(By.ID, "who").text, what="sign-in")
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _session(url: str) -> None:
    """Sign in, ask, reload mid-answer, ask again and stop, reload: as a person would."""
    from selenium.webdriver.common.by import By

    with _signed_in(url) as driver:
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


async def test_a_person_chats_reloads_stops_and_sees_the_history(gw_config, llm):
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true")
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.12)
    async with worker_running(config), gateway_running(config) as (handle, _):
        await trio.to_thread.run_sync(_session, f"http://127.0.0.1:{handle.port}/")
    assert (ARTIFACTS / "gateway-page.png").stat().st_size > 1000


def _documents(url: str, document: Path) -> None:
    """Sign in, upload a document, ask from it and see its source, delete it."""
    from selenium.webdriver.common.by import By

    with _signed_in(url) as driver:
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


# Every text the last answer box shows, recorded by the page itself on each change.
_RECORD_TEXTS = """
window.__texts = [];
new MutationObserver(() => {
  const boxes = document.querySelectorAll(".assistant .answer");
  if (!boxes.length) return;
  const text = boxes[boxes.length - 1].textContent;
  if (window.__texts[window.__texts.length - 1] !== text) window.__texts.push(text);
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""


def _continued(url: str, shown: threading.Event) -> tuple[list[str], str, str, str]:
    """Sign in and ask; set `shown` once tokens show; wait for the answer to finish
    (its worker is swapped meanwhile). Returns every text the answer showed, what
    streamed, the status and the job id."""
    from selenium.webdriver.common.by import By

    with _signed_in(url) as driver:
        driver.execute_script(_RECORD_TEXTS)
        driver.find_element(By.ID, "message").send_keys("Count across a deploy")
        driver.find_element(By.ID, "send").click()
        _wait(lambda: len(driver.execute_script("return window.__texts.at(-1) || ''")
                          .split()) >= 5, what="tokens to appear")
        job_id = driver.execute_script("return sessionStorage.getItem('job')")
        shown.set()
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant[data-status]"),
              timeout_s=90, what="the continued answer to finish")
        box = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        return (driver.execute_script("return window.__texts"),
                box.get_attribute("data-streamed") or "", box.get_attribute("data-status"),
                job_id)


async def test_an_answer_continues_across_a_worker_restart_without_flicker(gw_config, llm, rds):
    """The worker answering is stopped mid-answer (a deploy, no grace left) and another
    takes the job over: the page keeps what it showed and the answer carries on."""
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true",
                       CHAT_ACTORS__SHUTDOWN__GRACE_S="0")
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.12, continues=True)
    shown = threading.Event()
    result: list[tuple[list[str], str, str, str]] = []

    async def browse(url: str) -> None:
        result.append(await trio.to_thread.run_sync(_continued, url, shown))

    async with gateway_running(config) as (handle, _), trio.open_nursery() as nursery:
        nursery.start_soon(browse, f"http://127.0.0.1:{handle.port}/")
        async with worker_running(config):
            await until(shown.is_set, 60)
        async with worker_running(config):
            await until(lambda: bool(result), 120)
    texts, streamed, status, job_id = result[0]
    expected = "".join(TOKENS)
    assert status == "completed" and streamed.strip() == expected.strip()
    # Never cleared, never cut, never repeated: each text the page showed starts the next.
    assert texts[-1].strip() == expected.strip()
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert len(llm.calls) == 2 and llm.calls[1].messages[-1]["role"] == "assistant"
    started = [json.loads(f["data"]) for _, f in rds.xrange(config.job_keys(job_id).stream)
               if f["event"] == "started"]
    assert started[-1]["resumes"]["attempt"] == 1 and started[-1]["resumes"]["chars"] > 0
