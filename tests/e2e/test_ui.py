"""The /ui/ page in a real browser (Debian's headless chromium, driven by selenium through
Debian's chromedriver) against the session's real sidecar and Kamailio: log in, watch an
account's bar move while a real SIP call starts and ends, force-release a call from the page
(with its confirmation), and a screenshot of the page with calls up and refusals, saved in
test-artifacts/ (TEST_ARTIFACTS overrides the folder).

Selenium blocks, and the SIP user agents of the test run on the event loop: every browser
step runs in a thread (Browser.run) so the phones keep answering meanwhile."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.e2e.conftest import ADMIN_TOKEN, E2E, Api, Phones
from tests.e2e.test_calls import answered, ringing

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PW = "s3cret"
# An account name an attacker chose: it must show as text, never become markup.
HOSTILE = '<img src=x id=pwned onerror="document.title=1">'


def plan() -> dict[str, Any]:
    """prov -> acme (2 calls, 20 cps; named by an attacker) -> two digest extensions."""
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "prov", "name": "The Provider", "limits": {"calls": 50}},
            {"id": "acme", "name": HOSTILE, "parent": "prov", "limits": {"calls": 2, "cps": 20}},
            {"id": "quiet", "parent": "prov", "limits": {"calls": 5}},
        ],
        "extensions": [
            {"id": "1001", "account": "acme", "password": PW},
            {"id": "1002", "account": "acme", "password": PW},
            {"id": "1003", "account": "acme", "password": PW},
        ],
    }


class Browser:
    """One headless chromium; run() does a blocking selenium step in a thread."""

    def __init__(self) -> None:
        assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
            "chromium and chromium-driver are installed by scripts/install-system.sh (make deps)"
        )
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1400,1000"):
            options.add_argument(arg)
        self.driver: WebDriver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    async def run(self, step: Callable[[WebDriver], Any]) -> Any:
        return await asyncio.to_thread(step, self.driver)

    async def wait(self, what: str, check: Callable[[WebDriver], Any], within: float = 10) -> Any:
        """Poll check(driver) until it returns something true; fail naming `what`."""
        end = time.monotonic() + within
        last: Any = None
        while time.monotonic() < end:
            try:
                last = await self.run(check)
            except (StaleElementReferenceException, WebDriverException) as exc:
                last = exc  # the page re-rendered under us: look again
            else:
                if last:
                    return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"page never showed {what} (last: {last!r})")

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = await asyncio.to_thread(Browser)
    try:
        yield b
    finally:
        await asyncio.to_thread(b.close)


def bar_active(account: str, counter: str = "calls") -> Callable[[WebDriver], str | None]:
    """The figure the page shows in an account's bar (data-active), or None if not shown."""
    def read(d: WebDriver) -> str | None:
        found = d.find_elements(
            By.CSS_SELECTOR, f'tr[data-account="{account}"] [data-counter="{counter}"]')
        return found[0].get_attribute("data-active") if found else None
    return read


def shows(account: str, active: int) -> Callable[[WebDriver], bool]:
    return lambda d: bar_active(account)(d) == str(active)


async def test_live_page_follows_real_calls(
    e2e: E2E, api: Api, phones: Phones, browser: Browser
) -> None:
    await api.put_config(plan())
    url = f"{e2e.sidecar.url}/ui/"

    # The form first; a wrong token is refused and says so; the right one opens the board.
    await browser.run(lambda d: d.get(url))
    await browser.wait("the token form", lambda d: d.find_element(By.ID, "login").is_displayed())

    def log_in(token: str) -> Callable[[WebDriver], None]:
        def step(d: WebDriver) -> None:
            field = d.find_element(By.ID, "token")
            field.clear()
            field.send_keys(token)
            d.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        return step

    await browser.run(log_in("not-the-token"))
    await browser.wait("the refusal of a wrong token",
                       lambda d: "refused" in d.find_element(By.ID, "login-error").text)
    await browser.run(log_in(ADMIN_TOKEN))
    await browser.wait("acme's bar at 0", shows("acme", 0))
    assert await browser.run(lambda d: d.find_element(By.ID, "board").is_displayed())

    # The hostile name is text on the page, and no element came of it.
    row_text = await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-account="acme"]').text)
    assert HOSTILE in row_text
    assert await browser.run(lambda d: d.find_elements(By.ID, "pwned")) == []

    # A real call through Kamailio: the bar moves to 1 while it is up, back to 0 after BYE.
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    await browser.wait("acme's bar at 1 while ringing", shows("acme", 1))
    await answered(api, call, inc)
    await browser.wait("the call in the calls table", lambda d: d.find_elements(
        By.CSS_SELECTOR, f'#calls tr[data-call="{call.call_id}"]'))
    assert await browser.run(bar_active("prov")) == "1"  # the parent counts it too
    assert await call.bye() == 200
    await browser.wait("acme's bar back at 0 after BYE", shows("acme", 0))

    # Force-release from the page. "Keep the call" keeps it; "Release" gives the slot back.
    call2 = await caller.invite("1002", proxy=e2e.proxy)
    inc2 = await ringing(api, call2, callee)
    await answered(api, call2, inc2)
    await browser.wait("acme's bar at 1", shows("acme", 1))
    release = f'#calls button[data-release="{call2.call_id}"]'

    def click(selector: str) -> Callable[[WebDriver], bool]:
        def step(d: WebDriver) -> bool:
            found = d.find_elements(By.CSS_SELECTOR, selector)
            if found and found[0].is_displayed():
                found[0].click()
                return True
            return False
        return step

    await browser.wait("the release button", click(release))
    await browser.wait("the confirmation", click("#confirm-no"))
    await asyncio.sleep(2.5)  # at least one more poll
    assert await api.active("acme") == 1
    assert await browser.run(bar_active("acme")) == "1"
    await browser.wait("the release button", click(release))
    await browser.wait("the confirmation", click("#confirm-yes"))
    await browser.wait("acme's bar at 0 after the forced release", shows("acme", 0))
    assert await api.active("acme") == 0 and await api.calls() == []
    # The call's own BYE afterwards is answered and changes nothing.
    assert await call2.bye() == 200
    await asyncio.sleep(0.5)
    assert await api.active("acme") == 0


async def test_page_under_load_screenshot(
    e2e: E2E, api: Api, phones: Phones, browser: Browser
) -> None:
    """Two calls up (acme full), four refused (refusals per minute), the node's heartbeat;
    reached with #token= as automation would, then saved as a picture."""
    await api.put_config(plan())
    callee = await phones.registered_ua("1003", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    up = []
    for n in (1, 2):
        call = await caller.invite("1003", proxy=e2e.proxy)
        await call.wait_provisional(180, 5)
        inc = callee.incoming[-1]
        assert inc.call_id == call.call_id and inc.answer()
        assert await call.wait_final(5) == 200
        await inc.wait_acked(5)
        assert await api.wait_active(n, "acme") == n
        up.append(call)
    for _ in range(4):
        refused = await caller.invite("1003", proxy=e2e.proxy)
        assert await refused.wait_final(5) in (403, 486)

    await browser.run(lambda d: d.get(f"{e2e.sidecar.url}/ui/#token={ADMIN_TOKEN}"))
    await browser.wait("acme's bar at 2", shows("acme", 2))
    # The token left the address bar, and stays for this tab only.
    assert "token" not in await browser.run(lambda d: d.current_url)
    stored = await browser.run(
        lambda d: d.execute_script("return sessionStorage.getItem('sidecar-admin-token')"))
    assert stored == ADMIN_TOKEN
    bar_class = await browser.run(lambda d: d.find_element(
        By.CSS_SELECTOR, 'tr[data-account="acme"] .bar[data-counter="calls"]'
    ).get_attribute("class"))
    assert "full" in bar_class  # 2 of 2: red
    # The page's total is the API's (other tests of the session refuse acme's calls too).
    status, body = await api.call("GET", "/v1/refusals?minutes=15")
    expected = sum(r["refusals"] for r in body["refusals"] if r["counter"] == "account:acme:calls")
    assert status == 200 and expected >= 4
    await browser.wait(f"{expected} refusals of acme", lambda d: d.find_element(
        By.CSS_SELECTOR, '#refusals tr[data-refusals="account:acme:calls"]'
    ).text.split()[-1] == str(expected))
    await browser.wait("the node's heartbeat", lambda d: d.find_elements(
        By.CSS_SELECTOR, f'#nodes tr[data-node="{e2e.kamailio.node}"] .badge.alive'),
        within=15)
    # Search narrows the accounts to one.
    await browser.run(lambda d: d.find_element(By.ID, "account-search").send_keys("quie"))
    await browser.wait("only 'quiet' after the search", lambda d: [
        r.get_attribute("data-account")
        for r in d.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")] == ["quiet"])
    await browser.run(lambda d: d.find_element(By.ID, "account-search").clear())
    await browser.run(lambda d: d.find_element(By.ID, "account-search").send_keys(" "))
    await browser.wait("every account again", lambda d: len(
        d.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")) == 3)

    # The calls up, filtered by account: none for quiet, both for acme.
    await browser.run(lambda d: d.find_element(By.ID, "call-account").send_keys("quiet"))
    await browser.wait("no call for quiet", lambda d: not d.find_elements(
        By.CSS_SELECTOR, "#calls tbody tr") and "no call up for quiet" in d.find_element(
        By.ID, "calls-pager").text)
    await browser.run(lambda d: d.find_element(By.ID, "call-account").clear())
    await browser.run(lambda d: d.find_element(By.ID, "call-account").send_keys("acme"))
    await browser.wait("acme's two calls", lambda d: sorted(
        r.get_attribute("data-call") for r in d.find_elements(By.CSS_SELECTOR, "#calls tbody tr")
    ) == sorted(c.call_id for c in up))

    shot = ARTIFACTS / "ui-under-load.png"

    def screenshot(d: WebDriver) -> int:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(shot))
        return shot.stat().st_size

    assert await browser.run(screenshot) > 10_000
    print(f"screenshot: {shot}")
    for call in up:
        assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0
