"""Regenerate docs/run-page.png: the run page of RUN (``kcs-lens report RUN --html``), rendered
offline by headless Chromium (name resolution disabled) and cropped to the summary and the curves.

    python scripts/run_page_screenshot.py runs/building-seed84 [--out docs/run-page.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "run-page.png")
    ap.add_argument("--size", default="1400,1500", help="window width,height in pixels (the screenshot's size)")
    args = ap.parse_args()
    chromium = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
    if chromium is None:
        raise SystemExit("error: headless Chromium not found (apt-get install chromium)")
    from kcs_lens.evaluation.paper_report import report_runs

    with tempfile.TemporaryDirectory() as tmp:
        report_runs([args.run], Path(tmp) / "page", html=True)
        profile = Path(tmp) / "profile"
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                "--virtual-time-budget=5000",
                f"--window-size={args.size}",
                f"--screenshot={shot}",
                (Path(tmp) / "page.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
