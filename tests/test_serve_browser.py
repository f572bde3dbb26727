"""stage=serve's page in a real browser: headless Chromium (Debian's chromium and chromium-driver, through selenium)
against a uvicorn server on 127.0.0.1 — type a Korean prompt, see the next-token chart and a streamed completion."""

import shutil

import pytest

import kr3
from kr3 import serve

pytestmark = pytest.mark.e2e


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,860", "--lang=ko-KR")


def first_found(names) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile, or a skip that says what is missing and how to install it."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: uv sync installs it")
    binary, driver = first_found(BROWSERS), first_found(DRIVERS)
    if not binary or not driver:
        missing = " and ".join(what for what, found in (("chromium", binary), ("chromedriver", driver)) if not found)
        pytest.skip(f"the browser test cannot run: {missing} not found on PATH — "
                    "apt-get install -y chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


# how text is drawn in the page's font once its fonts have loaded: a glyph's pixels, or those of the box drawn for a
# character no font has (private use code points)
INK = """
const [text, missing, done] = arguments;
document.fonts.ready.then(() => {
  const ink = (t) => {
    const canvas = document.createElement("canvas");
    canvas.width = 120; canvas.height = 60;
    const c = canvas.getContext("2d");
    c.font = `40px ${getComputedStyle(document.body).fontFamily}`;
    c.fillText(t, 5, 45);
    return canvas.toDataURL();
  };
  done([ink(text), ink(missing)]);
});
"""


def test_the_page_completes_a_korean_review_and_charts_the_next_token(browser, served_run, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # greedy: a sampled completion may end at once (1.5 % of seeds here), and the page sends no seed
    base = live_server(serve.app(kr3.load(served_run, device="cpu", precision="fp32", temperature=0)))
    browser.get(f"{base}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "model").text.startswith("kr3"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("이 집 짜장면은")
    wait.until(lambda b: b.find_element(By.ID, "chart").get_attribute("data-prompt") == "이 집 짜장면은")
    rows = browser.find_elements(By.CSS_SELECTOR, "#chart .row")
    assert len(rows) == 10 and all(row.find_element(By.CLASS_NAME, "p").text.endswith("%") for row in rows)
    assert prompt.get_attribute("value") == "이 집 짜장면은"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text in ("done", "stopped at the length limit"))
    completion = browser.find_element(By.ID, "completion").text
    assert completion.strip() and any("가" <= ch <= "힣" for ch in completion), completion
    assert browser.find_element(By.ID, "shown-prompt").text == "이 집 짜장면은"
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    glyph, box = browser.execute_async_script(INK, "짜장", "\ue000\ue001")
    assert glyph != box, "Hangul is drawn as the missing-glyph box: no font on the page has it"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_the_page_steers_the_chart_and_the_completion_by_a_rating(browser, rated_run, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    model = kr3.load(rated_run, device="cpu", precision="fp32", guidance=2.5)
    browser.get(f"{live_server(serve.app(model))}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "model").text.startswith("kr3"))
    # record what the page asks the server
    browser.execute_script("window.sent = []; const f = window.fetch; window.fetch = (url, o) => "
                           "{ if (o && o.body) window.sent.push([url, JSON.parse(o.body)]); return f(url, o); }")
    guidance = browser.find_element(By.ID, "guidance")
    assert browser.find_element(By.ID, "guidance-control").is_displayed() and not guidance.is_enabled()
    assert guidance.get_attribute("value") == "2.5"  # the server's default
    browser.find_element(By.ID, "prompt").send_keys("이 집 짜장면은")
    Select(browser.find_element(By.ID, "rating")).select_by_value("negative")
    assert guidance.is_enabled()
    browser.execute_script("arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'))", guidance)
    chart = browser.find_element(By.ID, "chart")
    wait.until(lambda b: (chart.get_attribute("data-rating"), chart.get_attribute("data-guidance")) == ("negative", "2"))
    shown = [label.get_attribute("title") for label in browser.find_elements(By.CSS_SELECTOR, "#chart .token")]
    assert shown == [text for text, _ in model.next_tokens("이 집 짜장면은", 10, rating="negative", guidance=2)]
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text in ("done", "stopped at the length limit"))
    assert browser.find_element(By.ID, "completion").text.strip()
    sent = browser.execute_script("return window.sent")
    asked = {url: (body.get("rating"), body.get("guidance")) for url, body in sent}  # the last request to each
    assert asked == {"/v1/next_tokens": ("negative", 2), "/v1/completions": ("negative", 2)}
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
