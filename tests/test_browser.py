"""What a person sees in the two UIs, in a real browser (Debian's Chromium driven by Playwright) against the
services `rlhf up` starts: a deployment's run form in Prefect (every field described, the defaults shown, a bad
value refused in the form), the human judge's form (prompts and responses shown verbatim, one choice per prompt,
the answer reaching the waiting run), and MLflow's page of a run, opened from the link the flows log.

Without /usr/bin/chromium these tests skip, unless RLHF_REQUIRE_BROWSER=1 (CI sets it and installs the package).
With RLHF_SCREENSHOTS=<folder> each test leaves its screenshot there (docs/images/ holds the committed ones)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_service import free_port

from flows import service
from flows.tracking import Tracker, ensure_experiment, mlflow_run_url
from rlhf_core.config import GRPOConfig
from rlhf_core.config.fields import config_fields
from tasks.paths import use_tracking_uri

PROJECT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Chromium as root, headless, with nothing reaching for the network (this machine has none)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FORM_POOL = "browser-form"  # a pool with no worker: a run submitted from the form stays scheduled
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    yield page
    page.close()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """`rlhf up` on free ports in a data folder of its own: (Prefect UI URL, MLflow URL, that folder)."""
    home = tmp_path_factory.mktemp("browser") / "rlhf-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_HOME", str(home))
        started = service.up("127.0.0.1", free_port(), free_port(), timeout_s=120)
        try:
            with temporary_settings({PREFECT_API_URL: f"{started[0].url}/api"}):
                yield started[0].url, started[1].url, home
        finally:
            service.down()


def screenshot(page, name: str) -> None:
    if folder := os.environ.get("RLHF_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def form_field(page, label: str):
    """The innermost field of Prefect's schema form whose label reads `label` (e.g. "Lr (Optional)")."""
    return page.locator(".schema-form-property:has(> .p-label__header "
                        f".schema-form-property__label:text-is('{label}'))")


def shown(text: str) -> str:
    return " ".join(text.split())


def test_a_deployments_form_describes_every_field_shows_the_defaults_and_refuses_a_bad_value(services, page):
    prefect_url, _, home = services
    env = service.service_env(prefect_url)
    for command in (["work-pool", "create", FORM_POOL, "--type", "process"],
                    ["--no-prompt", "deploy", "--name", "grpo", "--pool", FORM_POOL]):
        done = subprocess.run([service.bin_path("prefect"), *command], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("grpo/grpo")

    page.goto(f"{prefect_url}/deployments/deployment/{deployment.id}/run")
    page.wait_for_load_state("networkidle")
    assert form_field(page, "Function (Optional)").locator("input, textarea").input_value() == "arithmetic_answer"
    lr = form_field(page, "Lr (Optional)").locator("input")
    assert float(lr.input_value()) == deployment.parameters["config"]["optim"]["lr"]
    screenshot(page, "prefect-run-form.png")
    page.get_by_role("button", name="LoraConfig", exact=True).click()  # LoRA defaults to None: its fields show
    form_field(page, "Rank (Optional)").wait_for()  # once it is chosen
    body = shown(page.inner_text("body"))
    written = {f.name: re.sub(r"^\((each item of|when) [\w.]+( is set)?\) ", "", f.description)  # less the docs'
               for f in config_fields(GRPOConfig, GRPOConfig())}                           # "(when lora is set)"
    undescribed = [name for name, text in written.items() if shown(text.replace("`", "")) not in body]
    assert undescribed == [], " ".join(undescribed)  # every description on the page as written: markdown mangled none
    assert page.locator("blockquote").count() == 0
    page.reload()  # the LoRA section back to None
    page.wait_for_load_state("networkidle")

    lr.fill("-1")
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Submit").click()
    page.get_by_text("Validation failed for field 'config.optim.lr'").first.wait_for(timeout=30_000)
    runs = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
    with get_client(sync_client=True) as client:
        assert client.read_flow_runs(flow_run_filter=runs) == []

    lr.fill("0.0001")
    form_field(page, "Iterations (Optional)").locator("input").fill("1")
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(f"{prefect_url}/deployments/deployment/{deployment.id}", timeout=30_000)  # run created
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=runs)
    config = GRPOConfig.model_validate(run.parameters["config"])  # what the worker's run will be given
    assert (config.iterations, config.optim.lr, config.rewards[0].function) == (1, 1e-4, "arithmetic_answer")


JUDGE_FLOW = '''
import sys
import pandas as pd
from prefect import flow
from tasks.preference_data import ask_human

@flow(name="human-judge-in-the-browser")
def judge(out: str):
    batch = pd.DataFrame({"prompt_id": [0, 0, 0, 1, 1], "sample_index": [0, 1, 2, 0, 1],
                          "prompt": ["Review the <hotel>."] * 3 + ["Review the *diner*."] * 2,
                          "response": ["Lovely <b>rooms</b>.", "", "Dirty and loud.", "Great pie!", "Cold coffee."]})
    ask_human(batch, timeout_s=600, poll_interval_s=1.0, key="judge-browser").to_json(out, orient="records")

judge(sys.argv[1])
'''


def test_a_person_answers_the_human_judges_form_on_the_run_page(services, page, tmp_path):
    """The form's text (prompts and responses, which may hold markdown or HTML) shown as written; an empty
    response not offered; the choices made in the browser reach the paused run."""
    prefect_url, _, home = services
    (tmp_path / "judge_flow.py").write_text(JUDGE_FLOW)
    answers = tmp_path / "answers.json"
    env = {**service.service_env(prefect_url), "PYTHONPATH": str(PROJECT)}
    flow = subprocess.Popen([sys.executable, str(tmp_path / "judge_flow.py"), str(answers)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not (paused := [r for r in client.read_flow_runs() if r.state and r.state.is_paused()]):
                assert flow.poll() is None and time.monotonic() < deadline, "the flow never paused"
                time.sleep(1)
        page.goto(f"{prefect_url}/runs/flow-run/{paused[0].id}")
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Resume").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Which response is best?").wait_for()
        text = dialog.inner_text()
        # each prompt twice (the list above the fields, the field's description), each response once, verbatim
        assert [text.count(s) for s in ("Review the <hotel>.", "Review the *diner*.", "Lovely <b>rooms</b>.",
                                        "Dirty and loud.", "Great pie!", "Cold coffee.")] == [2, 2, 1, 1, 1, 1]
        offered = {}
        for label, pick in (("Prompt 1", "3"), ("Prompt 2", "skip")):
            form_field(page, label).locator(".p-select-button__control").focus()
            page.keyboard.press("Space")  # opens Prefect's select
            options = page.get_by_role("option")
            options.first.wait_for()
            offered[label] = options.all_inner_texts()
            page.get_by_role("option", name=pick, exact=True).click()
        assert offered == {"Prompt 1": ["1", "3", "skip"], "Prompt 2": ["1", "2", "skip"]}
        screenshot(page, "prefect-human-judge.png")
        page.get_by_role("button", name="Submit").click()
        output, _ = flow.communicate(timeout=120)
        assert flow.returncode == 0, output
    finally:
        flow.kill()
    rows = json.loads(answers.read_text())
    assert [r["choice"] for r in rows] == ["3"] * 3 + ["skip"] * 2
    assert [r["score"] for r in rows[:3]] == [0.0, 0.0, 1.0] and all(r["score"] is None for r in rows[3:])


def test_the_logged_link_opens_the_run_in_model_training_with_its_registered_checkpoint(services, page, tmp_path,
                                                                                         monkeypatch):
    _, mlflow_url, home = services
    monkeypatch.setenv("RLHF_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    use_tracking_uri()
    client = mlflow.MlflowClient()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    experiment = ensure_experiment("browser")
    run = client.create_run(experiment, run_name="grpo-in-the-browser")
    Tracker(run.info.run_id).register_checkpoint(str(checkpoint), "b" * 64, "browser-policy", iteration=0)
    client.log_metric(run.info.run_id, "reward/mean", 0.5, step=0)
    client.set_terminated(run.info.run_id)

    page.goto(mlflow_run_url(experiment, run.info.run_id))  # MLflow polls: there is no network idle to wait for
    page.get_by_text("grpo-in-the-browser").first.wait_for(timeout=60_000)
    page.get_by_text("Registered models").last.wait_for()
    body = page.inner_text("body")
    assert "Model registry" in body and "Evaluation runs" not in body  # the sidebar of "Model training"
    assert re.search(r"Registered models\s+browser-policy\s+v1", body), body
    assert not math.isnan(float(re.search(r"reward/mean\s+([0-9.]+)", body).group(1)))
    screenshot(page, "mlflow-run.png")
