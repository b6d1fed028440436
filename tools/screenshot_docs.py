"""Builds the docs site and takes headless Chromium screenshots of some of its pages.

  python tools/screenshot_docs.py                          # index, quickstart, api
  python tools/screenshot_docs.py --pages index fairness --out /tmp/shots --width 900

Builds ``docs/`` with Sphinx (warnings as errors, as ``tests/test_docs.py`` does) into
``--html`` (default ``docs/_build/html``), then opens each page in Chromium without a
display and writes ``OUT/PAGE.png``. Chromium is Debian's ``chromium`` package
(``apt-get install -y chromium``); ``--chromium`` names another binary. It runs with
``--no-sandbox`` so that it also works as root in a container.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

from fairgen import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
doc_commands = cli.import_beside(__file__, "doc_commands")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--pages", nargs="+", default=["index", "quickstart", "api"],
                      help="Pages (docs/PAGE.md) to take a picture of.")
  parser.add_argument("--out", default="/tmp/fairgen_docs_screenshots",
                      help="Directory for PAGE.png.")
  parser.add_argument("--html", default=os.path.join(REPO, "docs", "_build", "html"),
                      help="Where the site is built.")
  parser.add_argument("--no_build", dest="build", action="store_false",
                      help="Use the site already built in --html.")
  parser.add_argument("--width", type=int, default=1280)
  parser.add_argument("--height", type=int, default=1600)
  parser.add_argument("--chromium", default=None, help="The browser binary.")
  return parser.parse_args(argv)


def build(html: str) -> None:
  """Builds the site with warnings as errors; a failed build is one error line."""
  result = subprocess.run(doc_commands.sphinx_build(html), capture_output=True, text=True)
  if result.returncode:
    cli.fail(f"the docs do not build: {result.stderr.strip().splitlines()[-1]}")


def browser(name: str | None) -> str:
  """The Chromium binary to use."""
  for candidate in [name] if name else BROWSERS:
    found = shutil.which(candidate)
    if found:
      return found
  cli.fail(f"no Chromium found ({name or ', '.join(BROWSERS)}): install Debian's package "
           f"with `apt-get install -y chromium`, or pass --chromium=PATH.")


def screenshot(binary: str, page_html: str, png: str, width: int, height: int) -> None:
  """One page's picture, taken by headless Chromium."""
  result = subprocess.run(
      [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
       f"--window-size={width},{height}", f"--screenshot={png}",
       "file://" + os.path.abspath(page_html)],
      capture_output=True, text=True, timeout=120)
  if result.returncode or not os.path.isfile(png):
    cli.fail(f"Chromium took no screenshot of {page_html}: {result.stderr.strip()[-300:]}")


def main(argv: list[str] | None = None) -> list[str]:
  """Builds the site (unless --no_build) and writes one PNG per page; returns their paths."""
  args = parse_args(argv)
  binary = browser(args.chromium)
  if args.build:
    build(args.html)
  os.makedirs(args.out, exist_ok=True)
  written = []
  for page in args.pages:
    page_html = os.path.join(args.html, f"{page}.html")
    if not os.path.isfile(page_html):
      cli.fail(f"{page_html} does not exist: --pages takes names of docs/*.md pages.")
    png = os.path.join(args.out, f"{page}.png")
    screenshot(binary, page_html, png, args.width, args.height)
    print(png)
    written.append(png)
  return written


if __name__ == "__main__":
  main()
