"""The review page in headless Chromium (Debian's ``chromium``, driven by Playwright), on SQLite and PostgreSQL:
refused without a session, sign in, filter the queue, approve one item, bulk-reject two, see the history,
and a screenshot of the queue."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import uvicorn

from pipeline.audit import AuditStore
from pipeline.review import create_app
from tests.pg import fresh_database
from tests.test_review_app import PASSWORDS, Dataset, populate

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


@contextmanager
def serve(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def queue_labels(page, data: Dataset) -> list[str]:
    ids = page.locator("#queue > tbody > tr").evaluate_all("rows => rows.map(r => r.dataset.itemId)")
    return sorted(data.label[i] for i in ids)


def review_flow(browser, base: str, data: Dataset, screenshot: str) -> None:
    ids = data.ids
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)

    # Without a session: the page sends us to sign in, images and state changes are refused.
    page.goto(base + "/?job=spring-shoes")
    assert re.search(r"/login\?next=%2F%3Fjob%3Dspring-shoes$", page.url), page.url
    assert context.request.get(f"{base}/images/{ids['swim']}").status == 401
    refused = context.request.post(f"{base}/bulk", form={"item_id": ids["sneaker"], "action": "approve"})
    assert refused.status == 401

    # Sign in: back to the page asked for.
    page.fill('input[name="name"]', "alice")
    page.fill('input[name="password"]', PASSWORDS["alice"])
    page.click('button[type="submit"]')
    page.wait_for_url(base + "/?job=spring-shoes")
    assert page.inner_text("#whoami") == "alice"
    assert queue_labels(page, data) == ["boot", "runner", "sandal", "sneaker"]

    # Filter the queue: NSFW at least 0.5 and the prompt search.
    page.fill('input[name="min_nsfw"]', "0.5")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"min_nsfw=0\.5"))
    assert queue_labels(page, data) == ["runner", "sandal", "sneaker"]
    page.fill('input[name="q"]', "SHOE")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"q=SHOE"))
    assert queue_labels(page, data) == ["runner"]

    # Approve one item on its page.
    page.click(f'#queue a[href="/items/{ids["runner"]}"] >> nth=0')
    page.wait_for_url(f"{base}/items/{ids['runner']}")
    assert page.locator("img.full").evaluate("img => img.complete && img.naturalWidth") == 128
    form = page.locator("form.review-approve")
    form.locator("select").select_option("false_positive")
    form.locator("textarea").fill("reflection, not skin")
    form.locator("button").click()
    page.wait_for_selector(".flash.ok")
    assert "approve recorded for 1 item(s) by alice" in page.inner_text(".flash.ok")
    assert page.inner_text("#effective") == "approved"

    # Bulk-reject two from the queue.
    page.goto(base + "/?job=spring-shoes")
    assert queue_labels(page, data) == ["boot", "sandal", "sneaker"]
    page.check("#select-all")  # the script selects every row ...
    assert page.locator("input[name=item_id]:checked").count() == 3
    page.uncheck("#select-all")
    assert page.locator("input[name=item_id]:checked").count() == 0
    for label in ("sneaker", "sandal"):
        page.check(f'input[name=item_id][value="{ids[label]}"]')
    page.select_option("#bulk-action", "reject")
    page.select_option("#bulk-reason", "nsfw_confirmed")
    page.fill('#bulk input[name="comment"]', "too revealing for the catalogue")
    page.click("#bulk-apply")
    page.wait_for_selector(".flash.ok")
    assert "reject recorded for 2 item(s) by alice" in page.inner_text(".flash.ok")
    assert page.url == base + "/?job=spring-shoes"
    assert queue_labels(page, data) == ["boot"]

    # The history of a rejected item.
    page.goto(f"{base}/items/{ids['sneaker']}")
    rows = page.locator("#history tbody tr")
    assert [r.split("\t")[2] for r in rows.all_inner_texts()] == ["item recorded", "review reject"]
    reject = page.locator("#history tr.review_reject").inner_text()
    assert "alice" in reject and "nsfw_confirmed" in reject and "too revealing for the catalogue" in reject
    assert page.inner_text("#effective") == "rejected"

    # The queue, as a reviewer sees it: every thumbnail loaded.
    page.goto(base + "/?decision=any&sort=nsfw")
    page.wait_for_load_state("networkidle")
    loaded = page.locator("img.thumb").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)
    page.screenshot(path=screenshot, full_page=True)

    page.click("text=Sign out")
    page.wait_for_url(re.compile(r"/login$"))
    page.goto(base + "/")
    assert "/login?next=" in page.url
    context.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_review_flow_in_chromium(backend: str, browser, tmp_path) -> None:
    with ExitStack() as stack:
        url = f"sqlite:///{tmp_path}/audit.db" if backend == "sqlite" else stack.enter_context(fresh_database())
        data = populate(url, tmp_path / "out")
        app = create_app(url, secret_key="browser-test-secret-0123456789abcdef")
        base = stack.enter_context(serve(app))
        screenshot = tmp_path / "queue.png"
        review_flow(browser, base, data, str(screenshot))

        with AuditStore(url, migrate=False) as store:
            decisions = store.effective_decisions([data.ids[k] for k in ("runner", "sneaker", "sandal", "boot")])
            assert list(decisions.values()).count("rejected") == 2
            assert decisions[data.ids["runner"]] == "approved" and decisions[data.ids["boot"]] == "review"
            assert {e["reviewer"] for e in store.history(data.ids["sandal"]) if e["kind"] == "review_reject"} == {
                "alice"
            }
    blob = screenshot.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 20_000, len(blob)
