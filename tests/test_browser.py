"""A user in a real browser: JupyterLab on 127.0.0.1, headless Debian Chromium driven by Playwright.

Opens the demo notebook, runs it, edits the model name and one prompt in the rendered form, runs it again
(Run all: the form cell must keep the edits), and checks that the merge used the edited values; then
restarts the kernel (the edits come back from the saved recipe) and ticks Upload without a token (Plan
refuses it before any download).
A screenshot is kept in artifacts/ (on failure too).

Needs: apt ``chromium``; pip ``playwright`` (its own browser download is NOT used) and ``jupyterlab``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "notebooks" / "presets" / "demo-tiny.ipynb"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("jupyterlab_widgets", "jupyterlab_widgets")):
        if importlib.util.find_spec(module) is None:
            return f"python package {package} is not installed (pip install {package})"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(kernel_env, tmp_path):
    """A JupyterLab server serving tmp_path/work with a token; yields (url, token, work folder)."""
    work, state = tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    # no news or update checks (nothing may leave 127.0.0.1), no toast over the notebook, no kernel dialog
    user_settings = {
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
        "notebook-extension/tracker": {"autoStartDefaultKernel": True},
    }
    for name, values in user_settings.items():
        path = state / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**kernel_env, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces")}
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         "--ServerApp.terminals_enabled=False"] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, token, work
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run_all(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()  # the name ends with its shortcut


def _wait_until_idle(page, timeout_ms: int) -> None:
    """No cell is queued or running ("[*]") and the last cell has an execution count."""
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-InputPrompt')].map(e => e.textContent);
            return prompts.length > 0 && !prompts.some(t => t.includes('*')) && /\\[\\d+\\]/.test(prompts[prompts.length - 1]);
        }""",
        timeout=timeout_ms,
    )


def _print_cells(page) -> None:
    """Each cell's prompt and the end of its output, printed (pytest shows it under a failure)."""
    try:
        cells = page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => [
            (c.querySelector('.jp-InputPrompt') || {}).textContent || '',
            (c.querySelector('.jp-OutputArea') || {}).innerText || ''])""", )
        status = page.locator(".jp-StatusBar-Widget").all_inner_texts()
    except Exception as err:  # the page itself may be what failed
        print(f"(could not read the notebook: {err})")
        return
    print("status bar:", " · ".join(t.strip() for t in status if t.strip()))
    for i, (prompt, output) in enumerate(cells):
        output = " ".join(output.split())
        print(f"cell {i} {prompt.strip()} {output[-400:]}")


def test_edit_the_form_in_jupyterlab_and_merge_with_the_edits(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token, work = jupyterlab
    shutil.copy(DEMO, work / DEMO.name)
    ARTIFACTS.mkdir(exist_ok=True)
    shots = [ARTIFACTS / "browser-form-edited.png", ARTIFACTS / "browser-merged.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/{DEMO.name}?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            select = page.get_by_role("button", name="Select", exact=True)
            if select.is_visible():  # a JupyterLab that ignores autoStartDefaultKernel asks for the kernel
                select.click()
            page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"Python 3.*\| Idle")).first.wait_for(timeout=120_000)

            # 1. Run all on the unedited preset: the whole pipeline, ending with the last cell's notice
            _run_all(page)
            page.get_by_text("nothing to chat with").wait_for(timeout=600_000)  # 13 steps, evaluation included
            _wait_until_idle(page, 60_000)
            assert (work / "LazyMoE-Demo-4x" / "config.json").is_file()
            # the routing picture at its own size, not shrunk until its numbers cannot be read
            sizes = page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output img')]
                .map(img => [img.naturalWidth, img.getBoundingClientRect().width])""")
            assert len(sizes) >= 2 and all(shown >= natural - 1 for natural, shown in sizes), sizes
            # every field's help is on screen, not only in hover tooltips; "none" is explained
            page.get_by_text("empty (none): the weights as they are").first.wait_for(state="visible", timeout=10_000)
            assert page.locator(".lazymoe-form .lazymoe-help").count() >= 12

            # 2. edit the rendered form like a user: the model name and the first expert's first prompt
            name = page.locator(".lazymoe-model-name input")
            name.scroll_into_view_if_needed()
            assert name.input_value() == "LazyMoE-Demo-4x"
            name.fill("Browser-Edited-MoE")
            name.press("Tab")
            prompts = page.locator(".lazymoe-positive textarea").first
            assert prompts.input_value().splitlines()[0] == "chat"
            prompts.fill("browser edited prompt\nassistant\ntell me\nexplain\nI want")
            prompts.press("Tab")
            page.locator(".lazymoe-form button", has_text="Check").click()
            page.get_by_text("Looks good: Browser-Edited-MoE").wait_for(timeout=30_000)
            name.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(shots[0]))

            # 3. Run all again: the form cell keeps the edits and every step reads them
            _run_all(page)
            merged = page.get_by_text(re.compile(r"Merged model written to .*Browser-Edited-MoE"))
            merged.wait_for(timeout=600_000)
            _wait_until_idle(page, 120_000)
            page.get_by_text("Your edits were kept").first.wait_for(timeout=10_000)
            merged.scroll_into_view_if_needed()
            page.screenshot(path=str(shots[1]))

            # 4. restart the kernel: every Python object is gone; the form cell restores the saved edits
            page.get_by_role("menuitem", name="Kernel", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).click()
            # first the server's answer to the restart request (it comes once the new kernel has answered its
            # kernel_info request), then the status bar: alone, it still reads "Idle" from before the restart
            # for a moment, and cells run in that moment are lost (seen once in CI: nothing ran, the test
            # waited out its 120 s)
            with page.expect_response(lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith("/restart"),
                                      timeout=120_000):
                page.locator(".jp-Dialog .jp-mod-accept").click()  # the dialog's "Restart" button
            page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"Python 3.*\| Idle")).first.wait_for(timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").nth(1).click()  # the setup cell, then run it and the next two
            for _ in range(3):
                page.keyboard.press("Shift+Enter")
            # the new kernel ran them: the setup cell is its first execution
            page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-InputPrompt", has_text="[1]").wait_for(
                timeout=120_000)
            page.get_by_text("Restored your edits from").first.wait_for(timeout=120_000)
            name = page.locator(".lazymoe-model-name input")
            assert name.input_value() == "Browser-Edited-MoE"
            assert page.locator(".lazymoe-positive textarea").first.input_value().splitlines()[0] == "browser edited prompt"
            assert page.locator(".lazymoe-saved").first.inner_text().startswith("💾 Every edit is saved to")

            # 5. tick Upload with no token anywhere: Plan (the next cell) refuses, before any download
            page.get_by_label("Upload to the Hugging Face Hub").check()
            page.locator(".jp-Notebook .jp-Cell").nth(4).click()
            page.keyboard.press("Shift+Enter")
            page.get_by_text("No Hugging Face token found").first.wait_for(timeout=60_000)
            page.get_by_text(re.compile("Stopped at .Plan")).first.wait_for(timeout=10_000)
            assert "upload: true" in (work / "LazyMoE-Demo-4x.lazymoe.yaml").read_text()
            # in the notebook's own words: the form field, not --token or token=
            page.get_by_text("type it into “…or a token” in the form's Hugging Face Hub section").first.wait_for(
                timeout=10_000)
            plan_cell = page.locator(".jp-Notebook .jp-Cell").nth(4)
            assert "--token" not in plan_cell.inner_text() and "token=" not in plan_cell.inner_text()

            # 5b. an expert that cannot be read: Plan fails while reading headers, and its bar goes with it
            # (before, a grey "2/5" bar stayed above the red message)
            expert = page.locator(".lazymoe-expert-model input").nth(2)
            expert.fill("lazymoe-demo/nowhere")
            expert.press("Tab")
            # the kernel has the edit once the form has saved it (widget values sync asynchronously; on a
            # busy machine Shift+Enter could otherwise run Plan with the old value)
            deadline = time.monotonic() + 60
            while not any("lazymoe-demo/nowhere" in f.read_text() for f in work.glob("*.lazymoe.yaml")):
                assert time.monotonic() < deadline, "the form never saved the edited expert"
                time.sleep(0.2)
            plan_cell.click()
            page.keyboard.press("Shift+Enter")
            plan_cell.locator(".lazymoe-error", has_text="nowhere").first.wait_for(timeout=60_000)
            _wait_until_idle(page, 30_000)
            assert plan_cell.locator(".widget-hprogress:visible, progress:visible").count() == 0, "a stale bar"
            expert.fill("lazymoe-demo/math")
            expert.press("Tab")

            # 6. two bad values: Check shows both at once, each under its field
            name.fill("bad name")
            name.press("Tab")
            noise = page.locator(".lazymoe-noise input").nth(1)
            noise.fill("abc")
            noise.press("Tab")
            page.locator(".lazymoe-form button", has_text="Check").click()
            page.get_by_text("2 problems, marked in red in the form").first.wait_for(timeout=30_000)
            assert page.locator(".lazymoe-field-error").count() == 2
            assert page.locator(".lazymoe-invalid").count() == 2
            # the form as a user sees it, narrow and wide (described in the note): the window as tall as the
            # form, since JupyterLab draws only what is on screen, and the notebook toolbar (it floats over the
            # top of whatever is scrolled under it) out of the way
            page.add_style_tag(content=".jp-NotebookPanel-toolbar {display: none !important}")
            for width in (900, 1400):
                page.set_viewport_size({"width": width, "height": 3600})
                page.locator(".lazymoe-form").first.screenshot(path=str(ARTIFACTS / f"form-after-{width}px.png"))
        except BaseException:
            _print_cells(page)  # what the notebook showed, in the CI log (the screenshot stays on that machine)
            with contextlib.suppress(Exception):  # a page that died cannot be photographed
                page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), timeout=30_000)
            shutil.copy(tmp_path / "jupyterlab.log", ARTIFACTS / "browser-jupyterlab.log")
            raise
        finally:
            browser.close()

    from lazymoe.config import load_config

    edited = load_config(work / "Browser-Edited-MoE" / "lazymoe_config.yml")
    assert edited.experts[0].positive_prompts == ["browser edited prompt", "assistant", "tell me", "explain", "I want"]
    assert [e.positive_prompts[0] for e in edited.experts[1:]] == ["code", "reason", "storywriting"]
    first = load_config(work / "LazyMoE-Demo-4x" / "lazymoe_config.yml")
    assert first.experts[0].positive_prompts[0] == "chat"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "Browser-Edited-MoE")
    assert model.config.num_local_experts == 4
    assert all(shot.stat().st_size > 10_000 for shot in shots)
