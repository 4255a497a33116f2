"""Screenshot `lorafit serve`'s page classifying and explaining one message, as the README shows it.

    python examples/page_screenshot.py --run runs/smollm2-decisions --out docs/page.png "WINNER!! Claim ..."

Starts the server on a free loopback port, opens the page in headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium: what tests/test_serve_page.py uses), types the message, waits for the
label and the token attributions, saves the PNG and stops the server.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the run directory to serve")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--precision", default="auto")
    p.add_argument("--size", default="1100,1000", help="window width,height in pixels")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server and the answers")
    p.add_argument("text")
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--run", args.run, "--host", "127.0.0.1",
                               "--port", "0", "--precision", args.precision], stdout=subprocess.PIPE, text=True)
    try:
        found = re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline())
        if not found:
            sys.exit(f"lorafit serve did not start (exit code {server.poll()})")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        with tempfile.TemporaryDirectory() as profile:
            for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         f"--window-size={args.size}", f"--user-data-dir={profile}"):
                options.add_argument(flag)
            browser = webdriver.Chrome(options=options,
                                       service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
            try:
                wait = WebDriverWait(browser, args.timeout)
                browser.get(found.group(0))
                wait.until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
                browser.find_element(By.ID, "text").send_keys(args.text)
                browser.find_element(By.ID, "classify").click()
                wait.until(lambda d: d.find_element(By.ID, "why-status").text.startswith("Why "))
                browser.save_screenshot(args.out)
            finally:
                browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
