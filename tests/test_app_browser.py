"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
``.ci/run`` installs when missing) driven through Selenium, against the page serving the shipped demo generator
on 127.0.0.1. Skipped, with the reason, only where no browser is installed.

``GALIP_APP_SCREENSHOT=docs/images/app.png`` also saves the page's screenshot there (the README's picture)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no Chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)",
)
N = 3
WAIT_S = 30


@pytest.fixture(scope="module")
def url():
    pytest.importorskip("gradio")
    from galip.app import Playground, build_page, load_sampler

    sampler, source = load_sampler(None, "cpu")  # what `make app` serves
    page = build_page(Playground(sampler, source))
    page.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield page.local_url
    page.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_prompt_to_images_same_seed_same_images_and_the_slider_moves_them(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url)
    prompt = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys(Keys.DELETE)
    browser.find_element(By.ID, "generate").click()  # an empty prompt: a message, not a stack trace
    toast = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".toast-body").text)
    assert "the prompt is empty" in toast and "Traceback" not in toast
    for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close"):
        close.click()
    prompt.send_keys("a small red triangle on a black background")
    set_number(browser, "#n input[type=number]", N)
    first = generate_with_seed(browser, 42, [])  # the seed of each under it: 42, 43, 44
    pixels = [decode(src) for src in first]
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.shape[0] >= 32 for p in pixels)
    status = browser.find_element(By.ID, "status").text
    assert f"{N} images in" in status and "on cpu" in status
    screenshot(browser, tmp_path)

    # Another seed, then the first again: the page serves images by their content, so the same seed gives back
    # the very same files.
    other = generate_with_seed(browser, 7, first)
    assert not all(np.array_equal(a, decode(b)) for a, b in zip(pixels, other, strict=True))
    again = generate_with_seed(browser, 42, other)
    for a, b in zip(pixels, map(decode, again), strict=True):
        np.testing.assert_array_equal(a, b)

    tab = next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Prompt" in t.text)
    tab.click()
    slider = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#p_t input[type=range]"))
    slider.send_keys(Keys.RIGHT)  # t = 0.05: the first image at the slider, near the 'from' prompt's
    start = wait_for(lambda: image_src(browser, "#p_image img"))
    slider.send_keys(Keys.END)  # t = 1: the 'to' prompt's (one move, so one answer to wait for)
    end = wait_for(lambda: (src := image_src(browser, "#p_image img")) != start and src)
    assert np.abs(decode(start).astype(int) - decode(end).astype(int)).mean() > 1.0


# ---------------------------------------------------------------------------------------------
def wait_for(probe, timeout: float = WAIT_S):
    """The first truthy value of ``probe()`` (exceptions count as not yet), or a failure after ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as err:  # the element is not there yet, or went stale while the page updated
            last, value = err, None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page did not get there in {timeout} s (last error: {last!r})")


def generate_with_seed(browser, seed: int, before: list[str]) -> list[str]:
    from selenium.webdriver.common.by import By

    set_number(browser, "#seed input", seed)
    browser.find_element(By.ID, "generate").click()
    captions = [f"seed {seed + i}" for i in range(N)]

    def arrived():  # every image replaced (other seeds, other pixels, other files) and no longer changing
        srcs = gallery_images(browser, N)
        if not srcs or set(srcs) & set(before):
            return None
        time.sleep(0.5)
        text = browser.find_element(By.ID, "gallery").text
        return gallery_images(browser, N) == srcs and all(c in text for c in captions) and srcs

    return wait_for(arrived)


def set_number(browser, selector: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)
    wait_for(lambda: box.get_attribute("value") == str(value))


def gallery_images(browser, n: int) -> list[str] | None:
    from selenium.webdriver.common.by import By

    srcs = [im.get_attribute("src") for im in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
    srcs = list(dict.fromkeys(s for s in srcs if s))  # a preview may repeat a thumbnail
    return srcs if len(srcs) == n else None


def image_src(browser, selector: str) -> str | None:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0].get_attribute("src") if found else None


def decode(src: str) -> np.ndarray:
    """The image behind an ``<img src>`` (served over loopback), decoded; read again while the server is still
    writing the file (a short read)."""
    return wait_for(lambda: [_read(src)])[0]


def _read(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def screenshot(browser, tmp_path: Path) -> None:
    browser.save_screenshot(str(tmp_path / "app.png"))
    if target := os.environ.get("GALIP_APP_SCREENSHOT"):
        shutil.copyfile(tmp_path / "app.png", target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
