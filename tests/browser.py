"""Headless Chromium (Debian `chromium` + `chromium-driver`) driven by Selenium, for the report pages.

Pages people look at are tested as they see them: opened from a file:// URL in a real browser,
with the browser's console and network events read back through the driver's logs. The flags keep
Chromium from phoning home (background networking, component updates, sync): on a machine without
internet its own connections would otherwise show up as failed requests.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1280,1600")
MISSING = ("headless Chromium is missing ({path} not found): run scripts/setup_env.sh, which installs the "
           "Debian packages chromium and chromium-driver (and selenium with the test extras)")


@contextmanager
def chromium() -> Iterator[object]:
    """A Selenium Chrome driver on the system Chromium, with console and performance logs on."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise RuntimeError(MISSING.format(path=path))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise RuntimeError(MISSING.format(path="the selenium package")) from err
    profile = tempfile.mkdtemp(prefix="tagbeam-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_problems(driver) -> list[str]:
    """Console messages of level WARNING or SEVERE since the last call (errors, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def requested_urls(driver) -> list[str]:
    """Every URL the page asked the network stack for since the last call (from performance logs)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def artifact_dir() -> str:
    """Where screenshots go: $TAGBEAM_TEST_ARTIFACTS, else a folder under the temp dir (printed by the tests)."""
    folder = os.environ.get("TAGBEAM_TEST_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "tagbeam-test-artifacts")
    os.makedirs(folder, exist_ok=True)
    return folder


def load(driver, path: str) -> tuple[list[str], list[str]]:
    """Opens `path` from a file:// URL; returns (console problems, requests beyond the page itself
    and its data: URIs) that the load caused. Earlier logs (the new-tab page) are drained first."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get_log("performance")
    url = "file://" + os.path.abspath(path)
    driver.get(url)
    driver.execute_script("return document.readyState")
    others = [u for u in requested_urls(driver) if u != url and not u.startswith("data:")]
    return console_problems(driver), others


def screenshot(driver, name: str) -> str:
    """Saves a full-height screenshot as a test artifact and returns its path."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 800), 12000))
    path = os.path.join(artifact_dir(), name)
    driver.save_screenshot(path)
    print(f"screenshot: {path}")
    return path
