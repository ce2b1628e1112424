"""The admin console in a real headless Chromium: sign-in, create (the key shown once), edit,
rotate, test, delete, the table, the usage chart and the audit log, against a real gateway, its
admin listener and a sandbox upstream. Saves a screenshot to tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import asyncio
import tempfile
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.admin_setup import ADMIN_TOKEN, Admin, Client, start_admin
from tests.conftest import CREDS_A, KEY_A, Upstream

pytestmark = pytest.mark.slow

CHROMIUM: Final = "/usr/bin/chromium"
CHROMEDRIVER: Final = "/usr/bin/chromedriver"
FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1500,1100",
)
SCREENSHOT: Final = Path(__file__).resolve().parent / "artifacts" / "admin-console.png"
WAIT: Final = 10.0


def start_browser(profile: str) -> webdriver.Chrome:
    """Debian's Chromium, headless, with a fresh profile; failing to start fails the test."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def status_with_key(proxy_url: str, key: str) -> int:
    """What the gateway answers ``key`` on /api/openapi/status (from the browser's thread)."""
    request = urllib.request.Request(proxy_url + "/api/openapi/status", headers={"x-api-key": key})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class Console:
    """The page, driven like an operator would."""

    def __init__(self, browser: webdriver.Chrome):
        self.browser = browser
        # The table is drawn anew after every change: an element found a moment ago may be gone.
        self.wait = WebDriverWait(
            browser, WAIT, ignored_exceptions=(StaleElementReferenceException,)
        )

    def find(self, css: str) -> WebElement:
        return self.wait.until(lambda b: b.find_element(By.CSS_SELECTOR, css))

    def until(self, check: Callable[[], bool], what: str) -> None:
        self.wait.until(lambda _b: check(), message=what)

    def row(self, alias: str) -> WebElement:
        xpath = f"//tbody/tr[td[contains(@class, 'alias')]/strong[text()='{alias}']]"
        return self.wait.until(lambda b: b.find_element(By.XPATH, xpath))

    def click_in_row(self, alias: str, css: str) -> None:
        def click(_browser: webdriver.Chrome) -> bool:
            self.row(alias).find_element(By.CSS_SELECTOR, css).click()
            return True

        self.wait.until(click)

    def row_shows(self, alias: str, *texts: str) -> None:
        self.until(lambda: all(t in self.row(alias).text for t in texts), f"{texts} in {alias}")

    def rows(self) -> list[WebElement]:
        return self.browser.find_elements(By.CSS_SELECTOR, "#tenants tbody tr[data-tenant-id]")

    def dialog_open(self, dialog_id: str) -> bool:
        return bool(
            self.browser.execute_script(f"return document.getElementById('{dialog_id}').open")
        )

    def fill(self, form: str, **fields: str) -> None:
        for name, value in fields.items():
            field = self.find(f"#{form} [name={name}]")
            field.clear()
            field.send_keys(value)

    def new_key(self) -> str:
        self.until(lambda: self.dialog_open("key-dialog"), "the new-key dialog")
        key = str(self.find("#new-key").get_attribute("value"))
        self.find("#copy-key").click()
        self.until(lambda: bool(self.find("#copy-state").text), "the copy button's answer")
        self.find("#key-dialog [data-close]").click()
        self.until(lambda: not self.dialog_open("key-dialog"), "the new-key dialog closing")
        # Shown once, then forgotten (the dialog's close handler clears it).
        self.until(lambda: self.find("#new-key").get_attribute("value") == "", "the key cleared")
        return key


def sign_in(console: Console) -> None:
    console.fill("sign-in-form", token="not-the-token-0123456789-0123456789")
    console.find("#sign-in-form button").click()
    console.until(lambda: "Invalid admin token" in console.find("#notice").text, "the refusal")
    console.fill("sign-in-form", token=ADMIN_TOKEN)
    console.find("#sign-in-form button").click()
    console.until(lambda: len(console.rows()) == 3, "the three tenants")


def create_edit_rotate(console: Console, base_url: str, proxy_url: str) -> tuple[str, str]:
    """The first key and the one the rotation made."""
    console.find("#new-tenant").click()
    console.fill(
        "tenant-form",
        alias="tenant-new",
        description="Shop opened today",
        accessKey=CREDS_A.access_key,
        accessSecret=CREDS_A.access_secret.reveal(),
        baseUrl=base_url,
        numbersPerDay="500",
    )
    console.find("#tenant-save").click()
    first = console.new_key()
    assert first.startswith("nxk_") and status_with_key(proxy_url, first) == 200
    console.row_shows("tenant-new", "numbersPerDay: 500", base_url)
    console.click_in_row("tenant-new", "button.edit")
    console.fill("tenant-form", description="Edited in the console")
    console.find("#tenant-save").click()
    console.row_shows("tenant-new", "Edited in the console")
    console.click_in_row("tenant-new", "button.rotate")
    console.fill("rotate-form", graceSeconds="600")
    console.find("#rotate-form button[type=submit]").click()
    second = console.new_key()
    assert second != first and status_with_key(proxy_url, second) == 200
    assert status_with_key(proxy_url, first) == 200  # still within its grace
    console.until(
        lambda: len(console.row("tenant-new").find_elements(By.CSS_SELECTOR, "ul.keys li")) == 2,
        "two keys after the rotation",
    )
    console.row_shows("tenant-new", "until")
    return first, second


def revoke_first_key(console: Console, proxy_url: str, key: str) -> None:
    console.click_in_row("tenant-new", "ul.keys li:first-child button.revoke")
    console.until(lambda: console.dialog_open("confirm-dialog"), "the confirmation")
    console.find("#confirm-yes").click()
    console.until(
        lambda: len(console.row("tenant-new").find_elements(By.CSS_SELECTOR, "ul.keys li")) == 1,
        "one key after the revocation",
    )
    assert status_with_key(proxy_url, key) == 403


def refused_in_words(console: Console) -> None:
    console.find("#new-tenant").click()
    console.fill("tenant-form", alias="tenant-a", baseUrl="ftp://nowhere")
    console.find("#tenant-save").click()
    errors = console.find("#tenant-form-errors")
    console.until(lambda: "INVALID_TENANT" in errors.text, "the refusal in the form")
    assert "baseUrl=ftp://nowhere: not an http(s) URL" in errors.text
    assert console.dialog_open("tenant-dialog")
    console.find("#tenant-dialog [data-close]").click()


def check_test_and_chart(console: Console) -> None:
    console.click_in_row("tenant-a", "button.test")
    console.until(lambda: console.find("#test-verdict").text.startswith("OK"), "the test result")
    assert "200" in console.find("#test-details").text
    console.find("#test-dialog [data-close]").click()
    console.click_in_row("tenant-a", "button.usage")
    console.until(
        lambda: len(console.browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")) == 30,
        "30 bars in the chart",
    )
    bars = console.browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")
    assert [bar.get_attribute("data-requests") for bar in bars][-3:] == ["12", "0", "30"]
    assert float(bars[-1].get_attribute("height") or 0) > float(
        bars[-3].get_attribute("height") or 0
    )
    assert console.browser.find_elements(By.CSS_SELECTOR, "#chart polyline.numbers")
    console.row_shows("tenant-a", "30 req · 120 numbers")
    assert console.find("#usage-tenant").text == "tenant-a"


def delete(console: Console, proxy_url: str, key: str) -> None:
    console.click_in_row("tenant-new", "button.delete")
    console.until(lambda: console.dialog_open("confirm-dialog"), "the confirmation")
    console.find("#confirm-yes").click()
    console.until(lambda: len(console.rows()) == 3, "the row to go")
    assert "Deleted tenant-new" in console.find("#notice").text
    assert status_with_key(proxy_url, key) == 403


def drive(admin_url: str, proxy_url: str, base_url: str) -> None:
    """The whole session, in a thread: the servers keep running on the test's event loop."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = start_browser(profile)
        try:
            console = Console(browser)
            browser.get(admin_url)
            sign_in(console)
            refused_in_words(console)
            first, key = create_edit_rotate(console, base_url, proxy_url)
            check_test_and_chart(console)
            audit = console.find("#audit-table").text
            assert "tenant.create" in audit and "key.rotate" in audit and "tenant.update" in audit
            storage = browser.execute_script(
                "return [sessionStorage.length, localStorage.length, document.cookie]"
            )
            assert storage == [1, 0, ""]
            SCREENSHOT.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(SCREENSHOT))
            revoke_first_key(console, proxy_url, first)
            delete(console, proxy_url, key)
        finally:
            browser.quit()


async def seed_usage(admin: Admin) -> None:
    """Three days of tenant A's traffic: today, two days ago, and nothing yesterday."""
    today = datetime.now(UTC).date()
    days = {0: (30, 120), 2: (12, 40)}
    counts = {
        ("tenant-a", (today - timedelta(days=n)).isoformat()): {
            "requests": requests,
            "numbersAppended": numbers,
        }
        for n, (requests, numbers) in days.items()
    }
    await admin.state.add_usage(counts, 86400 * 40, source="console-test", seq=1)


async def test_console_manages_tenants_in_a_real_browser(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    tmp_path: Path,
    upstream: Upstream,
) -> None:
    admin = await start_admin(aiohttp_client, tmp_path, upstream.base_url)
    await seed_usage(admin)
    admin_url = str(admin.client.make_url("/admin/"))
    proxy_url = str(admin.proxy.make_url("")).rstrip("/")
    await asyncio.to_thread(drive, admin_url, proxy_url, upstream.base_url)
    assert (
        await admin.proxy.get("/api/openapi/status", headers={"x-api-key": KEY_A})
    ).status == 200
    assert SCREENSHOT.stat().st_size > 10_000
