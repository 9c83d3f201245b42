"""Screenshots of a real report page for the README, taken in headless Chromium (tests/browser.py).

    python scripts/report_screenshot.py --page work/demo/model/report.html --output docs/report.png

Opens the page from its file like a person would, checks it loaded without a console error or a
network request, optionally opens one label's section, and saves the top `--height` pixels.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from browser import chromium, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", required=True, help="report.html, summary.html or a night's report.html")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--height", type=int, default=2200, help="pixels from the top of the page to keep")
    parser.add_argument("--scroll_to", default=None, help="an element id to start the picture at (e.g. label-3)")
    args = parser.parse_args(argv)
    from PIL import Image

    with chromium() as driver:
        problems, requests = load(driver, args.page)
        if problems or requests:
            print(f"error: {args.page} logged {problems} and requested {requests}", file=sys.stderr)
            return 1
        top = 0
        if args.scroll_to:
            top = int(driver.execute_script(
                "const e = document.getElementById(arguments[0]); if (e.tagName === 'DETAILS') e.open = true;"
                "return e.getBoundingClientRect().top + window.scrollY", args.scroll_to))
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1280, min(height, top + args.height) + 120)
        picture = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
        picture.crop((0, top, picture.width, min(picture.height, top + args.height))).save(args.output, optimize=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
