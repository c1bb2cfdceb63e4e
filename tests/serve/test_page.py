"""The web page in a real headless Chromium (Debian's chromium + chromium-driver; `make browser`)."""

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mgllava.inference import GenerationSettings
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread

from ..serving import ShapesProposer, scene, tiny_engine

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,800"]  # fmt: skip


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are needed: run `make browser`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


@pytest.mark.slow
def test_page_streams_an_answer_and_draws_the_boxes(browser, tmp_path):
    engine = tiny_engine(ShapesProposer())
    photo = tmp_path / "shapes.png"
    scene(3, (320, 200)).save(photo)
    with serve_in_thread(create_app(engine, ServerSettings(model_name="tiny"))) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "model: tiny")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: b.find_element(By.ID, "preview").get_attribute("naturalWidth") == "320")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("24")
        browser.find_element(By.ID, "question").send_keys("What shapes are in the image?")
        browser.find_element(By.ID, "ask").click()
        answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state='done']"))
        boxes = browser.find_elements(By.CSS_SELECTOR, "#overlay .box")
        labels = [b.find_element(By.CLASS_NAME, "box-label").text for b in boxes]
        browser.save_screenshot(str(tmp_path / "page.png"))
        print(f"screenshot: {tmp_path / 'page.png'}")

        expected = engine.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What shapes are in the image?"}],
                }
            ],
            images=[photo],
            settings=GenerationSettings(24),
        )
        assert answer.text == expected.text
        assert labels == ["circle 0.90", "square 0.70"]
        image = browser.find_element(By.ID, "preview").rect
        first = boxes[0].rect  # the proposer's first box: x 10%..50%, y 10%..60% of the image
        assert first["x"] - image["x"] == pytest.approx(0.1 * image["width"], abs=3)
        assert first["width"] == pytest.approx(0.4 * image["width"], abs=3)
        assert "circle, square" in browser.find_element(By.ID, "tags").text

        # a second turn keeps the conversation (and its image) going
        browser.find_element(By.ID, "question").send_keys("And the colours?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='done']")) == 2)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert engine.features.hits >= 1
