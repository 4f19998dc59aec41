"""Run a tiny DP-MEPF pipeline against a local Prefect server and check, in headless Chromium, that the
Prefect UI shows its artifacts: the release summary, the training progress, the metrics table and the
evaluation report with its images.

    .venv/bin/python scripts/ui_check.py                                   # about 1-2 minutes on 2 cores
    .venv/bin/python scripts/ui_check.py --screenshot docs/prefect_artifacts.png

It starts `prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME under
`--workdir` (scripts/local_stack.py's process handling), runs custodian-release (the first 200
Fashion-MNIST training images, replace-one), train-generator (10 steps), sample (200 images) and
evaluate (logistic regression, FID on `--fid-images` (200) synthetic against as many test images) in one process against that
server, then opens each artifact page in headless Chromium (Debian `chromium` and
`chromium-driver`, driven by Selenium) and checks what the browser rendered: the table's cells, every
image decoded (`naturalWidth > 0`), the release summary's claim, the progress at 100%. It prints a
JSON report (also `WORKDIR/ui_check.json`) and stops the server, also on errors. Exit 0 when every
check passed, 1 otherwise. `--cheap-fid` replaces Inception by a stand-in (three pixel values per
image): for tests, where the FID value does not matter, only that its row and counts are shown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("ui_check")

PAGE_TIMEOUT_S = 90.0  # a page's data arrives from the API after the app has loaded; slow on busy cores
WINDOW = (1600, 1000)  # wide enough for the metrics table's nine columns


def _local_stack():
    spec = importlib.util.spec_from_file_location("local_stack", REPO / "scripts" / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_stack", module)
    spec.loader.exec_module(module)
    return module


# The pipeline, in one process against the server (PREFECT_API_URL): each stage is its own flow run.
RUNNER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    work, cheap_fid, fid_images = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    if cheap_fid:  # Inception replaced by three pixel values per image (tests: the value does not matter)
        import os
        os.environ["MEPF_CACHE_DIR"] = str(work / "cache")  # never mix with real reference statistics
        import tasks.evaluation as ev
        ev.load_fid_inception = lambda device: None
        ev.images_to_inception_activations = (
            lambda model, images, device, progress: np.asarray(images, np.float64).reshape(len(images), -1)[:, :3])
    from flows.custodian_release import custodian_release
    from flows.evaluate import evaluate
    from flows.train_generator import sample, train_generator
    from storage.params import EvaluateParams, ReleaseParams, SampleParams, TrainParams
    release, run, report = work / "release.h5", work / "run", work / "report"
    stages = [  # parameters built when their stage starts: each validates the previous stage's output
        ("custodian-release", custodian_release, lambda: ReleaseParams(
            out=str(release), target_epsilon=10.0, limit=200, neighbouring="replace-one",
            ledger=str(work / "budget-ledger.jsonl"), budget=20.0)),
        ("train-generator", train_generator, lambda: TrainParams(
            release=str(release), out=str(run), steps=10, batch_size=80, checkpoint_every=5, eval_samples=100,
            progress=False)),
        ("sample", sample, lambda: SampleParams(run=str(run), n=200)),
        ("evaluate", evaluate, lambda: EvaluateParams(
            run=str(run), out=str(report), reference="fashion-mnist:test", classifiers=("logreg",),
            fid_samples=fid_images, fid_reference=fid_images, allow_small_fid=True)),
    ]
    ids = {}
    for name, flow, params in stages:
        state = flow(params(), return_state=True)
        ids[name] = str(state.state_details.flow_run_id)
        if not state.is_completed():
            raise SystemExit(f"{name} ended {state.name}: {state.message}")
    sys.stdout.write(json.dumps(ids) + "\\n")
""")


def run_pipeline(workdir: Path, env: dict, cheap_fid: bool, timeout: float, fid_images: int = 200) -> dict[str, str]:
    """Flow run id of each stage; raises RuntimeError (with the log's tail) when a stage fails."""
    log = workdir / "logs" / "pipeline.log"
    with open(log, "wb") as err:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(workdir), "1" if cheap_fid else "0", str(fid_images)],
                              cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=err, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the pipeline failed (status {proc.returncode}); see {log}:\n"
                           + log.read_text(errors="replace")[-3000:])
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


# --- the browser ----------------------------------------------------------------------------------

def browser():
    """Headless Chromium through chromedriver (both Debian packages: `apt-get install chromium chromium-driver`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise RuntimeError("headless checks need Debian's chromium and chromium-driver: "
                           "apt-get install -y chromium chromium-driver (scripts/setup.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(driver, condition, what: str, timeout: float = PAGE_TIMEOUT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        body = driver.find_element("tag name", "body").text[-1500:]
        raise RuntimeError(f"the page {driver.current_url} did not show {what} within {timeout:.0f} s; "
                           f"it shows:\n{body}") from None


def _text(driver) -> str:
    return driver.find_element("tag name", "body").text


def _images(driver) -> list[tuple[str, int]]:
    """(src prefix, naturalWidth) of every <img> in the page's main content: 0 = not decoded (broken)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('img')).map(i => [i.src.slice(0, 30), i.complete ? "
        "i.naturalWidth : 0]);")


def _screenshot(driver, path: Path, height: int | None = None) -> Path:
    """A screenshot of the page, its window `height` px tall (default: tall enough for the whole
    content, within 5000 px; the UI scrolls inside an inner element, so every element is measured)."""
    for _ in range(1 if height is not None else 2):  # grow, then measure again once laid out
        tall = height or min(5000, 300 + int(driver.execute_script(
            "return Math.max(...Array.from(document.querySelectorAll('*')).map(e => e.scrollHeight))")))
        driver.set_window_size(WINDOW[0], max(WINDOW[1], tall))
        time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.set_window_size(*WINDOW)
    return path


def check_in_browser(ui: str, ids: dict[str, str], artifacts: dict[str, dict], shots: Path) -> dict:
    """Open the pages a person would, check what they render; returns what was seen (raises on a failure).

    `artifacts`: artifact key -> its record (id, data) as the API serves it (tasks.artifacts).
    """
    from tasks.artifacts import METRICS_KEY, RELEASE_KEY, REPORT_KEY, TRAINING_PROGRESS_KEY

    seen: dict = {}
    driver = browser()
    try:
        # 1. The evaluate flow run's page, Artifacts tab: its table and report are listed.
        driver.get(f"{ui}/runs/flow-run/{ids['evaluate']}")
        tab = _wait(driver, lambda d: [e for e in d.find_elements("css selector", "li.p-tab")
                                       if e.text.strip() == "Artifacts"], "the Artifacts tab")
        tab[0].click()
        _wait(driver, lambda d: METRICS_KEY in _text(d) and REPORT_KEY in _text(d), "the evaluation's artifacts")
        seen["flow_run_tab"] = _screenshot(driver, shots / "evaluate_run_artifacts.png", WINDOW[1]).name

        # 2. The metrics table artifact: a rendered <table> with the FID row and its counts.
        driver.get(f"{ui}/artifacts/artifact/{artifacts[METRICS_KEY]['id']}")
        cells = _wait(driver, lambda d: [c.text.strip() for c in d.find_elements("css selector", "table td")]
                      or None, "a table")
        table = artifacts[METRICS_KEY]["data"]
        fid = next(r for r in table if r["metric"] == "fid")
        for wanted in ("fid", "acc_logreg", str(fid["fid_synthetic_count"]), str(fid["fid_reference_count"]),
                       fid["release_id"], fid["relation"]):
            if wanted not in cells:
                raise RuntimeError(f"the metrics table does not show {wanted!r}; its cells: {cells[:40]}")
        seen["table_cells"] = len(cells)
        seen["table"] = _screenshot(driver, shots / "metrics_table.png").name

        # 3. The evaluation report: every image decoded (data URIs), none broken.
        driver.get(f"{ui}/artifacts/artifact/{artifacts[REPORT_KEY]['id']}")
        images = _wait(driver, lambda d: [i for i in _images(d) if i[0].startswith("data:image/png")] or None,
                       "the report's images")
        _wait(driver, lambda d: all(w > 0 for src, w in _images(d) if src.startswith("data:")), "decoded images", 30)
        seen["report_images"] = [w for src, w in _images(driver) if src.startswith("data:image/png")]
        if len(seen["report_images"]) < 2:
            raise RuntimeError(f"the report shows {len(images)} embedded image(s), expected the plot and the samples")
        seen["report"] = _screenshot(driver, shots / "evaluation_report.png").name

        # 4. The release summary and 5. the training progress.
        release = artifacts[RELEASE_KEY]
        driver.get(f"{ui}/artifacts/artifact/{release['id']}")
        release_id = release["data"].split("`")[1]
        _wait(driver, lambda d: release_id in _text(d) and "moment1" in _text(d) and "epsilon" in _text(d),
              "the release summary")
        seen["release"] = _screenshot(driver, shots / "release_summary.png").name
        driver.get(f"{ui}/artifacts/artifact/{artifacts[TRAINING_PROGRESS_KEY]['id']}")
        _wait(driver, lambda d: "100%" in _text(d) or "100 %" in _text(d), "the training progress at 100%")
        seen["progress"] = _screenshot(driver, shots / "training_progress.png", WINDOW[1]).name
    finally:
        driver.quit()
    return seen


def _content(image):
    """The screenshot cut below its last row of content (the page's background colour below it)."""
    import numpy as np

    pixels = np.asarray(image).astype(int)
    body = pixels[:, 250:-450]  # the main column: without the navigation bar and the details panel
    background = body[-1, 0]
    rows = np.nonzero((np.abs(body - background).sum(axis=2) > 150).any(axis=1))[0]  # text, not the faint backdrop
    bottom = min(image.height, int(rows[-1]) + 40) if len(rows) else image.height
    return image.crop((0, 0, image.width, max(bottom, 200)))


def montage(shots: Path, out: Path) -> Path:
    """One PNG for the README: release summary and training progress on the left, the report on the right."""
    from PIL import Image

    left = [_content(Image.open(shots / n).convert("RGB"))
            for n in ("release_summary.png", "metrics_table.png", "training_progress.png")]
    right = _content(Image.open(shots / "evaluation_report.png").convert("RGB"))
    height = max(sum(im.height for im in left), right.height)
    canvas = Image.new("RGB", (left[0].width + right.width, height), "white")
    y = 0
    for im in left:
        canvas.paste(im, (0, y))
        y += im.height
    canvas.paste(right, (left[0].width, 0))
    canvas = canvas.resize((canvas.width // 2, canvas.height // 2), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def run(workdir: Path, cheap_fid: bool, screenshot: Path | None, timeout: float, fid_images: int = 200) -> dict:
    stack_mod = _local_stack()
    workdir.mkdir(parents=True, exist_ok=True)
    home, shots = workdir / "prefect-home", workdir / "screenshots"
    home.mkdir(exist_ok=True)
    shots.mkdir(exist_ok=True)
    port = stack_mod.free_port()
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                PREFECT_CLI_PROMPT="false")
    server_env = {**base, "PREFECT_SERVER_UI_ENABLED": "true", "PREFECT_UI_API_URL": api}
    client_env = {**base, "PREFECT_API_URL": api}
    stack = stack_mod.Stack(workdir)
    report: dict = {"ok": False, "ui": ui, "workdir": str(workdir)}
    started = time.monotonic()
    try:
        server = stack.start("server", stack_mod.prefect_argv("server", "start", "--host", "127.0.0.1", "--port",
                                                              str(port)), server_env)
        stack_mod.wait_for_health(api, server, stack_mod.SERVER_START_TIMEOUT_S)
        report["server_up_s"] = round(time.monotonic() - started, 1)
        ids = run_pipeline(workdir, client_env, cheap_fid, timeout, fid_images)
        report.update(flow_runs=ids, pipeline_done_s=round(time.monotonic() - started, 1))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from tasks.artifacts import artifacts_of_flow_run

        # this process reads the artifacts back from the same server; a setting in context (a test
        # harness's server) would win over the environment, so set it the same way, and only here
        with temporary_settings(updates={PREFECT_API_URL: api}):
            artifacts = {a["key"]: a for fr in ids.values() for a in artifacts_of_flow_run(fr) if a["key"]}
        report["artifacts"] = {k: a["type"] for k, a in artifacts.items()}
        report["seen"] = check_in_browser(ui, ids, artifacts, shots)
        if screenshot is not None:
            report["screenshot"] = str(montage(shots, screenshot))
        report["ok"] = True
    finally:
        stack.stop_all()
        report["seconds"] = round(time.monotonic() - started, 1)
        (workdir / "ui_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="new folder (default: a temporary one)")
    parser.add_argument("--screenshot", type=Path, default=None, help="write the montage PNG here")
    parser.add_argument("--cheap-fid", action="store_true", help="replace Inception by a stand-in (tests)")
    parser.add_argument("--fid-images", type=int, default=200, help="synthetic and reference images of the FID")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the pipeline may take")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mepf-ui-"))
    try:
        report = run(workdir, args.cheap_fid, args.screenshot, args.timeout, args.fid_images)
    except Exception as exc:  # one line and exit 1: the details are in WORKDIR/logs
        sys.stderr.write(f"ui check FAILED: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
