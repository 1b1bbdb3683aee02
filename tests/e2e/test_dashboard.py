"""The dashboard at `/`, driven in Debian's headless chromium by Playwright against a real API and worker.

It signs in with a key, pauses the queue, submits a batch through the form (reading the estimate first),
resumes and watches the progress bar and the thumbnails arrive, opens a job's memory chart, cancels and
retries a batch, walks the queue page by keyboard, and signs in with a second key that sees none of it.
Every host but 127.0.0.1 is unresolvable, so a page that needed the internet would fail here. Screenshots
of each page land in test-artifacts/dashboard/ (git-ignored).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.stack import Stack
from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import add_key
from jobs.settings import Settings

try:
    from playwright.sync_api import ConsoleMessage, Page, Request, Response, expect, sync_playwright
except ImportError:  # the dev extra not installed
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
PROMPTS = ["a lighthouse at dusk", "a red fox in the snow", "a neon street in the rain"]
BROWSER_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
MAX_PAGE_BYTES = 1024 * 1024
BY = "\N{MULTIPLICATION SIGN}"  # how the dashboard writes a size: 64\N{MULTIPLICATION SIGN}64
NO_CHROMIUM = "needs Debian's `chromium` package (apt-get install chromium)"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True),  # the embedded default
    pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM),
    pytest.mark.skipif(sync_playwright is None, reason="needs the playwright package (make install)"),
]


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    """An admin key for alice and a plain one for bob, issued as `nightrender keys add` does."""
    engine = make_database(settings.resolved_database_url())
    try:
        with transaction(make_session_factory(engine)) as session:
            return {"alice": add_key(session, name="alice", admin=True), "bob": add_key(session, name="bob")}
    finally:
        engine.dispose()


@pytest.fixture
def stack(settings: Settings, keys: dict[str, str]) -> Iterator[Stack]:
    """The API and one worker on synthetic:tiny, stopped even when the test fails."""
    running = Stack(settings)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def page() -> Iterator[Page]:
    """A chromium tab; the browser is closed whatever happens."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            tab = context.new_page()
            tab.set_default_timeout(20_000)
            expect.set_options(timeout=20_000)
            yield tab
        finally:
            browser.close()


def test_the_dashboard_drives_the_real_stack(
    stack: Stack, page: Page, settings: Settings, keys: dict[str, str], tmp_path: Path
) -> None:
    base = settings.resolved_api_url()
    problems = watch_for_problems(page, base)
    sign_in(page, base, keys["alice"])

    page.click("#pause-queue")
    expect(page.locator("#queue-state")).to_have_text("paused")
    batch_id = submit_through_the_form(page)
    watch_it_render(page, batch_id)
    job_id = open_a_job(page)
    see_the_memory_page(page)
    second = cancel_and_retry(page, tmp_path)
    resume_and_finish(page, second)
    walk_the_queue_by_keyboard(page)
    assert page_bytes(page, f"{base}/#/batch/{batch_id}") < MAX_PAGE_BYTES
    # Last, on a paused queue: the worker never wades through the 10,000 cancelled jobs' messages.
    a_big_batch_pages_its_gallery(page, base, keys["alice"])
    another_key_sees_nothing(page, keys["bob"], batch_id, job_id)
    assert problems == [], problems


def test_without_keys_the_dashboard_opens_on_loopback(
    api_only: Stack, page: Page, settings: Settings
) -> None:
    """The embedded default has no key: this machine's browser gets the queue at once, with no login."""
    base = settings.resolved_api_url()
    problems = watch_for_problems(page, base)
    page.goto(f"{base}/")
    expect(page.locator("#queue-state")).to_have_text("running")
    expect(page.get_by_text("No batches yet.")).to_be_visible()
    expect(page.get_by_label("API key")).to_have_count(0)
    expect(page.get_by_role("button", name="Forget key")).to_be_hidden()
    assert problems == [], problems


def watch_for_problems(page: Page, base: str) -> list[str]:
    """Script errors, console errors (CSP refusals among them) and any request that left 127.0.0.1."""
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not _expected(message.text):
            problems.append(message.text)

    def on_request(request: Request) -> None:
        if _off_site(request.url, base):
            problems.append(f"off-site request {request.url}")

    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", on_console)
    page.on("request", on_request)
    return problems


def _expected(text: str) -> bool:
    # The browser logs each 401 and 404 the dashboard asks for on purpose (no key yet, another key's batch).
    return "401" in text or "404" in text


def _off_site(url: str, base: str) -> bool:
    return not (url.startswith(base) or url.startswith(("blob:", "data:")))


def shot(page: Page, name: str) -> None:
    """A full-page screenshot, kept as a test artefact."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def go_to(page: Page, name: str) -> None:
    """Follow a link of the header's navigation."""
    page.locator("nav.pages").get_by_role("link", name=name).click()


def sign_in(page: Page, base: str, key: str) -> None:
    """The login form appears (keys exist), refuses a wrong key, and lets the right one in."""
    page.goto(f"{base}/")
    expect(page.get_by_label("API key")).to_be_visible()
    page.get_by_label("API key").fill("nr_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-problem")).to_contain_text("refused")
    shot(page, "login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#queue-state")).to_have_text(re.compile("running|paused"))


def submit_through_the_form(page: Page) -> str:
    """Fill the form, read the budget hint, submit; returns the new batch's id."""
    fill_the_form(page, seeds="1, 2", priority="3")
    page.get_by_label("Prompts, one a line").fill("\n".join(PROMPTS))
    # 3 prompts x 2 seeds at one size: the estimate follows the form before anything is queued.
    expect(page.locator("#estimate")).to_contain_text(f"64{BY}64: 6 images")
    assert page.locator("#estimate .summary").inner_text().strip()
    shot(page, "submit")
    return press_submit(page)


def fill_the_form(page: Page, *, seeds: str, priority: str) -> None:
    """Open the Submit page and choose 64x64, 2 steps, these seeds and this priority."""
    go_to(page, "Submit")
    page.get_by_label(f"1024{BY}1024 square").uncheck()
    page.get_by_label("Custom sizes").fill("64x64")
    page.get_by_label("Seeds").fill(seeds)
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Priority").fill(priority)


def press_submit(page: Page) -> str:
    """Submit the form; the batch's page opens. Returns its id."""
    page.get_by_role("button", name="Submit batch").click()
    page.wait_for_url(re.compile(r"#/batch/[A-Za-z0-9_-]+$"))
    return page.url.rsplit("/", 1)[1]


def watch_it_render(page: Page, batch_id: str) -> None:
    """Paused at 0 %, then resumed: the bar moves and the thumbnails appear, with no reload."""
    expect(page.locator("#batch-counts")).to_contain_text("6 queued")
    assert page.locator("#batch-progress").evaluate("p => p.value") == 0
    go_to(page, "Queue")
    row = page.locator(f'tr[data-batch="{batch_id}"]')
    expect(row.locator("td").nth(2)).to_have_text("3")  # its priority
    bar = row.locator("progress")
    assert bar.evaluate("p => p.value") == 0
    shot(page, "queue-paused")
    page.evaluate("window.__noReload = true")
    page.click("#resume-queue")
    page.wait_for_function("b => b.value > 0", arg=bar.element_handle())
    page.wait_for_function("b => b.value === 1", arg=bar.element_handle())
    images: dict[str, str] = {}

    def remember(response: Response) -> None:
        if "/v1/jobs/" in response.url:
            images[response.url] = response.headers.get("content-type", "")

    page.on("response", remember)
    row.get_by_role("link").click()
    expect(page.locator("#gallery img[src^='blob:']")).to_have_count(6)
    expect(page.locator("#batch-progress")).to_have_js_property("value", 1)
    expect(page.locator("#batch-status")).to_have_text("succeeded")
    assert page.evaluate("window.__noReload") is True, "the page reloaded"
    page.remove_listener("response", remember)
    # The gallery shows the cached thumbnails, never the full PNGs.
    assert len([url for url in images if url.endswith("/thumbnail")]) == 6, images
    assert all(not kind.startswith("image/png") for kind in images.values()), images
    shot(page, "batch")


def open_a_job(page: Page) -> str:
    """A job's page shows its image, its memory and time charts (uPlot canvases) and its plan."""
    page.locator(".thumb-link").first.click()
    page.wait_for_url(re.compile(r"#/job/[A-Za-z0-9_-]+$"))
    expect(page.locator("#job-memory .uplot canvas")).to_have_count(2)
    expect(page.locator("#job-memory figure.chart").first).to_have_attribute(
        "aria-label", "Seconds per phase"
    )
    expect(page.locator(".job-image img[src^='blob:']")).to_be_visible()
    expect(page.locator("#job-plan")).to_contain_text("Out-of-memory retries")
    expect(page.locator("#job-plan tbody tr")).to_have_count(1)  # one attempt: nothing ran out of memory
    expect(page.locator("#job-plan tbody tr").first).to_contain_text("ok")
    shot(page, "job")
    return page.url.rsplit("/", 1)[1]


def see_the_memory_page(page: Page) -> None:
    """The stats table as charts by size and plan, and the workers that reported."""
    go_to(page, "Memory")
    expect(page.locator("#memory-charts figure[aria-label^='Seconds per image'] canvas")).to_have_count(1)
    # Peak VRAM is drawn once a job measured some; CI renders on the CPU, which measures none.
    expect(page.locator("#memory-charts figure[aria-label^='Peak reserved VRAM'], #no-vram")).to_have_count(1)
    expect(page.locator("#stats-table")).to_contain_text(f"64{BY}64")
    expect(page.locator("main")).to_contain_text("Workers")
    shot(page, "memory")


def cancel_and_retry(page: Page, tmp_path: Path) -> str:
    """While paused, a second batch (an uploaded file) is cancelled and retried from the queue page."""
    go_to(page, "Queue")
    page.click("#pause-queue")
    expect(page.locator("#queue-state")).to_have_text("paused")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"cancel me"\n{"prompt": "and me", "seed": 5}\n')
    fill_the_form(page, seeds="", priority="0")
    page.get_by_label("Or upload a .txt, .csv or .jsonl file").set_input_files(prompts)
    expect(page.locator("#estimate")).to_contain_text(f"64{BY}64: 2 images")
    second = press_submit(page)
    expect(page.locator("#batch-counts")).to_contain_text("2 queued")
    go_to(page, "Queue")
    row = page.locator(f'tr[data-batch="{second}"]')
    row.get_by_role("button", name=re.compile("^Cancel")).click()
    expect(row.locator(".status")).to_have_text("cancelled")
    row.get_by_role("button", name=re.compile("^Retry")).click()
    expect(row.locator(".status")).to_have_text("queued")
    return second


def a_big_batch_pages_its_gallery(page: Page, base: str, key: str) -> None:
    """A 10,000-job batch: its gallery shows 48 jobs a page, and neither page load reaches 1 MB."""
    go_to(page, "Queue")
    page.click("#pause-queue")
    expect(page.locator("#queue-state")).to_have_text("paused")
    client = api(base, key)
    body = {"prompts": [f"prompt {i}" for i in range(10_000)], "width": 64, "height": 64, "steps": 2}
    big = client.post("/v1/batches", json=body).json()["id"]
    try:
        assert page_bytes(page, f"{base}/#/") < MAX_PAGE_BYTES
        assert page_bytes(page, f"{base}/#/batch/{big}") < MAX_PAGE_BYTES
        expect(page.locator("#gallery li")).to_have_count(48)
        page.get_by_role("button", name="Next page").click()
        expect(page.locator("#gallery li").first).to_contain_text("prompt 48")
        expect(page.get_by_role("button", name="Previous page")).to_be_enabled()
    finally:
        client.post(f"/v1/batches/{big}/cancel", json={})


def resume_and_finish(page: Page, second: str) -> None:
    """Resumed from the queue page, the retried batch renders."""
    go_to(page, "Queue")
    page.click("#resume-queue")
    expect(page.locator(f'tr[data-batch="{second}"] .status')).to_have_text("succeeded")
    shot(page, "queue")


def walk_the_queue_by_keyboard(page: Page) -> None:
    """Tab reaches every button and link on the queue page, each with a visible focus ring."""
    targets = page.evaluate(
        """() => [...document.querySelectorAll('button, a[href]')]
             .filter(el => el.offsetParent !== null && !el.disabled)
             .map((el, i) => { el.dataset.kb = i; return i; })"""
    )
    assert len(targets) >= 6  # nav links, pause, batch links, retry and the footer's links
    page.evaluate("document.activeElement.blur()")
    reached: set[int] = set()
    for _ in range(len(targets) + 10):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            """() => { const el = document.activeElement;
                 return [el.dataset.kb ?? null, getComputedStyle(el).outlineStyle]; }"""
        )
        if focused[0] is not None:
            reached.add(int(focused[0]))
            assert focused[1] != "none", "a focused control shows no focus ring"
    assert reached == set(targets)


def page_bytes(page: Page, url: str) -> int:
    """Bytes a first load of `url` fetches with nothing cached, once its requests have settled."""
    devtools = page.context.new_cdp_session(page)
    devtools.send("Network.enable")
    devtools.send("Network.setCacheDisabled", {"cacheDisabled": True})
    try:
        page.goto(url)
        page.reload()  # a fresh document: its resource timings cover this load only
        expect(page.locator("main h1")).to_be_visible()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(500)  # the gallery's thumbnails start after its first answer
        page.wait_for_load_state("networkidle")
        sent: int = page.evaluate(
            "() => performance.getEntries().reduce((n, e) => n + (e.transferSize || 0), 0)"
        )
    finally:
        devtools.send("Network.setCacheDisabled", {"cacheDisabled": False})
        devtools.detach()
    assert sent > 50_000, f"{url}: {sent} bytes is too few to be the dashboard (uPlot alone is 50 KB)"
    print(f"{url}: {sent} bytes")
    return sent


def another_key_sees_nothing(page: Page, key: str, batch_id: str, job_id: str) -> None:
    """Bob signs in after alice forgets her key: no batches listed, alice's batch and job are not found."""
    page.goto(f"{page.url.split('#')[0]}#/")
    page.get_by_role("button", name="Forget key").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("No batches yet.")).to_be_visible()
    expect(page.locator("#batch-rows tr")).to_have_count(0)
    shot(page, "other-key")
    for kind, item in (("batch", batch_id), ("job", job_id)):
        page.evaluate(f"location.hash = '#/{kind}/{item}'")
        expect(page.locator("#not-found")).to_contain_text(f"{kind} {item} not found")


def api(base: str, key: str) -> httpx.Client:
    """An HTTP client with the key."""
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
