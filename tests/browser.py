"""Headless Chromium driven through chromedriver with plain W3C WebDriver calls (urllib).

Debian's ``chromium`` and ``chromium-driver`` packages; :func:`ensure_chromium` installs them
where they are missing. No Selenium: the few endpoints the tests need are a JSON POST or GET
each.

Example::

    with chromium_session(tmp_path, ensure_chromium()) as browser:
        browser.get(path.as_uri())
        png = browser.element_screenshot(browser.find("#class-iou-chart"))
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--window-size=1280,1600",
    "--force-device-scale-factor=1",
)
"""Flags of every Chromium the tests start."""

PACKAGES = ("chromium", "chromium-driver")
"""The Debian packages providing ``chromium`` and ``chromedriver``."""

_ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier
# Loopback only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WebDriverError(RuntimeError):
    """A WebDriver command failed; the message is chromedriver's."""


@dataclass(frozen=True)
class Chromium:
    """Where the browser and its driver are."""

    binary: str
    """The ``chromium`` executable."""
    driver: str
    """The ``chromedriver`` executable."""


def _find() -> Chromium | None:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return Chromium(binary, driver) if binary and driver else None


def ensure_chromium(timeout_s: float = 480) -> Chromium:
    """Chromium and chromedriver, installed with apt-get where absent.

    ``apt-get update`` runs only if the first install fails (stale package lists).

    Args:
        timeout_s: Seconds each apt-get call may take.

    Raises:
        RuntimeError: They cannot be installed (the message has apt-get's last lines).
    """
    found = _find()
    if found is not None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    done = run(install)
    if done.returncode != 0:
        run(["apt-get", "update"])
        done = run(install)
    found = _find()
    if done.returncode != 0 or found is None:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"cannot install {' '.join(PACKAGES)} with apt-get:\n{tail}")
    return found


class Browser:
    """One WebDriver session.

    Args:
        base_url: The chromedriver URL, e.g. ``http://127.0.0.1:9515``.
        session_id: The session.
    """

    def __init__(self, base_url: str, session_id: str) -> None:
        self.base_url = base_url
        self.session_id = session_id

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return call(self.base_url, method, f"/session/{self.session_id}{path}", body)

    def get(self, url: str) -> None:
        """Open a URL and wait for the page to load."""
        self._call("POST", "/url", {"url": url})

    def title(self) -> str:
        """The page title."""
        return str(self._call("GET", "/title"))

    def find(self, css: str) -> str:
        """The first element matching a CSS selector (its WebDriver id)."""
        return str(
            self._call("POST", "/element", {"using": "css selector", "value": css})[_ELEMENT_KEY]
        )

    def find_all(self, css: str) -> list[str]:
        """Every element matching a CSS selector."""
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[_ELEMENT_KEY]) for e in found]

    @staticmethod
    def element_arg(element: str) -> dict[str, str]:
        """An element id as a script argument (``arguments[i]`` is then the element)."""
        return {_ELEMENT_KEY: element}

    def rect(self, element: str) -> dict[str, float]:
        """An element's x, y, width and height in CSS pixels."""
        return dict(self._call("GET", f"/element/{element}/rect"))

    def element_screenshot(self, element: str) -> bytes:
        """A PNG of one element, scrolled to the middle of the window first (chromedriver
        scrolls it only partly into view, and clips what stays outside)."""
        self.execute(
            "arguments[0].scrollIntoView({block: 'center', inline: 'center'});",
            self.element_arg(element),
        )
        return base64.b64decode(self._call("GET", f"/element/{element}/screenshot"))

    def execute(self, script: str, *args: Any) -> Any:
        """Run JavaScript in the page; its return value. Element ids go in as
        ``{ELEMENT_KEY: id}`` (see :meth:`element_arg`)."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def quit(self) -> None:
        """End the session (closes the browser)."""
        self._call("DELETE", "")


def call(base_url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One WebDriver command; its ``value``.

    Args:
        base_url: The chromedriver URL.
        method: ``GET``, ``POST`` or ``DELETE``.
        path: The endpoint, e.g. ``/status``.
        body: The JSON body of a POST.

    Raises:
        WebDriverError: The command failed.
    """
    data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
    request = urllib.request.Request(
        base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=60) as response:
            return json.loads(response.read())["value"]
    except urllib.error.HTTPError as exc:
        try:
            value = json.loads(exc.read())["value"]
            message = f"{value.get('error')}: {value.get('message', '').splitlines()[0]}"
        except (ValueError, KeyError, AttributeError, IndexError):
            message = str(exc)
        raise WebDriverError(f"{method} {path}: {message}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(
    base_url: str, driver: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise WebDriverError(
                f"chromedriver exited ({driver.returncode}): {log.read_text()[-2000:]}"
            )
        try:
            if call(base_url, "GET", "/status").get("ready"):
                return
        except (OSError, WebDriverError):
            pass
        time.sleep(0.1)
    raise WebDriverError(f"chromedriver not ready after {timeout_s} s: {log.read_text()[-2000:]}")


@contextmanager
def chromium_session(workdir: Path, chromium: Chromium) -> Iterator[Browser]:
    """Start chromedriver on a free loopback port and open one headless Chromium session.

    The session is quit and chromedriver (with anything it started) is stopped on the way
    out, whatever happens.

    Args:
        workdir: A directory for the browser profile and the driver's log.
        chromium: From :func:`ensure_chromium`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = workdir / "chromedriver.log"
    with log.open("wb") as log_file:
        # Its own process group, so the browser it spawns goes down with it.
        driver = subprocess.Popen(
            [chromium.driver, f"--port={port}", "--allowed-ips=127.0.0.1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    browser: Browser | None = None
    try:
        _wait_ready(base_url, driver, log, timeout_s=30)
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.binary,
                "args": [*CHROME_FLAGS, f"--user-data-dir={workdir / 'profile'}"],
            },
        }
        created = call(
            base_url, "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}
        )
        browser = Browser(base_url, str(created["sessionId"]))
        yield browser
    finally:
        try:
            if browser is not None:
                browser.quit()
        finally:
            _stop(driver)


def _stop(driver: subprocess.Popen[bytes]) -> None:
    """Stop chromedriver's process group: SIGTERM, then SIGKILL after a grace period."""
    if driver.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGTERM)
        try:
            driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=10)
    with suppress(ProcessLookupError):  # the browser, should it outlive its driver
        os.killpg(driver.pid, signal.SIGKILL)
