"""The form in the widgets-7 front end Colab's renderer speaks: classic Notebook 6, ipywidgets 7.7.1 and
widgetsnbextension 3.6.6, in headless Debian Chromium driven by Playwright.

The same user story as tests/test_browser.py (JupyterLab 4, widgets 8): open the demo notebook, Run all, edit
the model name and one prompt in the rendered form, press Build, and check that the merge used the edits.
Server and kernel run in the Colab stand-in environment that ``tools/colab_env.sh`` builds; set
LAZYMOE_COLAB_PYTHON to its interpreter (``.ci/run`` does). Screenshots go to artifacts/ (on failure too).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, DEMO, _free_port

COLAB_PYTHON = os.environ.get("LAZYMOE_COLAB_PYTHON")
pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not COLAB_PYTHON, reason="set LAZYMOE_COLAB_PYTHON to the Python tools/colab_env.sh builds"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} not found (apt-get install -y chromium)"),
]


def _colab_versions() -> dict[str, str]:
    code = "import ipywidgets, notebook, widgetsnbextension; print(ipywidgets.__version__, notebook.__version__, widgetsnbextension.__version__)"
    out = subprocess.run([COLAB_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(("ipywidgets", "notebook", "widgetsnbextension"), out))


@pytest.fixture
def classic_notebook(kernel_env, tmp_path):
    """Notebook 6 serving tmp_path/work from the Colab stand-in environment; yields (url, token, work folder)."""
    work, state = tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    # the stand-in's bin first on PATH, as in an activated virtualenv: the server must start the stand-in's own
    # kernel (ipywidgets 7.7.1), never the "python" of a kernelspec found elsewhere on this machine
    env = {**kernel_env, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTER_DATA_DIR": str(state / "data"),
           "PATH": os.pathsep.join([str(Path(COLAB_PYTHON).parent), kernel_env.get("PATH", "")])}
    specs = subprocess.run([COLAB_PYTHON, "-m", "jupyter", "kernelspec", "list", "--json"], env=env, check=True,
                           capture_output=True, text=True).stdout
    assert json.loads(specs)["kernelspecs"]["python3"]["spec"]["argv"][0] == COLAB_PYTHON
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "notebook.log", "w")
    server = subprocess.Popen(
        [COLAB_PYTHON, "-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         f"--NotebookApp.token={token}", f"--notebook-dir={work}", "--NotebookApp.terminals_enabled=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
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
                pytest.fail(f"Notebook 6 did not start:\n{(tmp_path / 'notebook.log').read_text()[-3000:]}")
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
    page.locator("#menus a.dropdown-toggle", has_text=re.compile(r"^\s*Cell\s*$")).click()
    page.locator("#run_all_cells > a").click()


def _wait_until_idle(page, timeout_ms: int) -> None:
    """No cell is queued or running ("In [*]") and the last code cell has an execution count."""
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('#notebook .code_cell .input_prompt')].map(e => e.textContent);
            return prompts.length > 0 && !prompts.some(t => t.includes('*')) && /\\[\\d+\\]/.test(prompts[prompts.length - 1]);
        }""",
        timeout=timeout_ms,
    )


def test_edit_the_form_in_the_widgets7_front_end_and_build_with_the_edits(classic_notebook, tmp_path):
    from playwright.sync_api import sync_playwright

    versions = _colab_versions()
    assert versions["ipywidgets"] == "7.7.1" and versions["notebook"].startswith("6.")
    assert versions["widgetsnbextension"] == "3.6.6"
    url, token, work = classic_notebook
    shutil.copy(DEMO, work / DEMO.name)
    ARTIFACTS.mkdir(exist_ok=True)
    shots = [ARTIFACTS / "widgets7-ran-all.png", ARTIFACTS / "widgets7-form-edited.png", ARTIFACTS / "widgets7-built.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        console: list[str] = []
        started = time.monotonic()
        page.on("console", lambda m: console.append(f"{m.type}: {m.text} [{time.monotonic() - started:.0f} s]"))
        try:
            page.goto(f"{url}/notebooks/{DEMO.name}?token={token}")
            page.wait_for_selector("#notebook .cell", timeout=90_000)
            page.wait_for_selector("#kernel_indicator_icon.kernel_idle_icon", timeout=120_000)

            # 1. Run all on the unedited preset: the whole pipeline, ending with the last cell's notice
            _run_all(page)
            page.get_by_text("nothing to chat with").wait_for(timeout=600_000)
            _wait_until_idle(page, 60_000)
            assert (work / "LazyMoE-Demo-4x" / "config.json").is_file()
            form = page.locator(".lazymoe-form")
            form.scroll_into_view_if_needed()
            page.screenshot(path=str(shots[0]))

            # 2. edit the rendered form like a user: the model name and the first expert's first prompt
            name = page.locator(".lazymoe-model-name input")
            name.scroll_into_view_if_needed()
            assert name.input_value() == "LazyMoE-Demo-4x"
            name.fill("Widgets7-Edited-MoE")
            name.press("Tab")
            prompts = page.locator(".lazymoe-positive textarea").first
            assert prompts.input_value().splitlines()[0] == "chat"
            prompts.fill("widgets7 edited prompt\nassistant\ntell me\nexplain\nI want")
            prompts.press("Tab")
            page.locator(".lazymoe-form button", has_text="Check").click()
            page.get_by_text("Looks good: Widgets7-Edited-MoE").wait_for(timeout=30_000)
            name.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(shots[1]))

            # 3. the form's own Build button: plan and merge from the edited form, into the form's Output
            page.locator(".lazymoe-form button", has_text="Build").click()
            merged = page.get_by_text(re.compile(r"Merged model written to .*Widgets7-Edited-MoE"))
            merged.wait_for(timeout=600_000)
            merged.scroll_into_view_if_needed()
            page.screenshot(path=str(shots[2]))
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "widgets7-failure.png"))
            shutil.copy(tmp_path / "notebook.log", ARTIFACTS / "widgets7-notebook.log")
            (ARTIFACTS / "widgets7-console.log").write_text("\n".join(console))
            outputs = page.locator("#notebook .output_area").all_text_contents()
            (ARTIFACTS / "widgets7-outputs.txt").write_text("\n----\n".join(outputs))
            raise
        finally:
            browser.close()

    # the only outside resource is the intro's Open-in-Colab badge, which cannot load without a network
    errors = [line for line in console if line.startswith("error:") and "net::ERR_NAME_NOT_RESOLVED" not in line]
    assert not errors, "the widgets-7 front end logged errors:\n" + "\n".join(errors)
    from lazymoe.config import load_config

    edited = load_config(work / "Widgets7-Edited-MoE" / "lazymoe_config.yml")
    assert edited.experts[0].positive_prompts == ["widgets7 edited prompt", "assistant", "tell me", "explain", "I want"]
    assert [e.positive_prompts[0] for e in edited.experts[1:]] == ["code", "reason", "storywriting"]
    first = load_config(work / "LazyMoE-Demo-4x" / "lazymoe_config.yml")
    assert first.experts[0].positive_prompts[0] == "chat"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "Widgets7-Edited-MoE")
    assert model.config.num_local_experts == 4
    assert all(shot.stat().st_size > 10_000 for shot in shots)
