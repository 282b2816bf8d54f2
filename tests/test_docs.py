"""The docs stay true to the code: the generated references are current, every metric the code can log is in the
catalog (and so documented), the README stays a front door whose links resolve, and the layout page names every
source file. Fast: no model, no Prefect server (the site itself is built by `make docs`)."""

from __future__ import annotations

import ast
import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

from flows.metrics_catalog import METRICS, catalog_entry, key_pattern, unknown_metrics

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "run `python scripts/docs_reference.py` and commit the result"

# String literals in rlhf_core/, flows/ and tasks/ shaped like metric keys that are not logged as metrics.
NOT_METRICS = {
    "checkpoints/iter_": "MLflow artifact folder prefix (flows/tracking.py)",
    "data/epoch_": "MLflow artifact folder prefix (flows/tracking.py)",
    "reward_model/eval_": "the prefix the reward-model flow renames its held-out metrics with",
    # per-step columns of the reward model's update-metrics Parquet, logged as reward_model/train_accuracy and
    # reward_model/eval_* by flows/reward_model.py
    "reward_model/accuracy": "update-metrics column",
    "reward_model/margin": "update-metrics column",
    "reward_model/chosen_rewards": "update-metrics column",
    "reward_model/rejected_rewards": "update-metrics column",
}
METRIC_SHAPED = re.compile(r"[a-z_]+(/[a-z_0-9]+)+")


def load_docs_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs_reference():
    return load_docs_reference()


def test_generated_references_are_current(docs_reference):
    for path, expected in docs_reference.pages().items():
        relative = path.relative_to(ROOT)
        assert path.is_file(), f"{relative} is missing: {REGENERATE}"
        assert path.read_text() == expected, f"{relative} is out of date with the code: {REGENERATE}"


def test_every_catalog_key_is_documented(docs_reference):
    page = docs_reference.metrics_reference()
    for key, description in METRICS.items():
        assert isinstance(description, str) and len(description.split()) >= 3, f"{key}: no real description"
        assert docs_reference.code(key) in page, f"{key} is not on the metrics page"


def test_catalog_patterns_match_their_family_only():
    assert catalog_entry("time/generation_s") == "time/<stage>_s"
    assert catalog_entry("time/checkpoint_s") == "time/checkpoint_s"  # a literal entry wins over the pattern
    assert key_pattern("time/<stage>_s").fullmatch("time/a/b_s") is None
    assert unknown_metrics(["reward/mean", "reward/meen", "time/_s"]) == ["reward/meen", "time/_s"]


def metric_shaped_literals() -> dict[str, list[str]]:
    """{string literal shaped like a metric key: files} over rlhf_core/, flows/ and tasks/ (f-string parts too)."""
    found: dict[str, list[str]] = {}
    for package in ("rlhf_core", "flows", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and METRIC_SHAPED.fullmatch(node.value):
                    found.setdefault(node.value, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_metric_key_in_the_source_is_in_the_catalog():
    literals = metric_shaped_literals()
    assert "reward/mean" in literals and "loss/policy" in literals  # the scan does find metric keys
    missing = {key: files for key, files in literals.items() if key not in NOT_METRICS and catalog_entry(key) is None}
    assert not missing, (f"metric-shaped literals not in flows/metrics_catalog.py: {missing}; add each with a "
                         f"description (or, if it is not a metric, to NOT_METRICS in tests/test_docs.py), then "
                         f"{REGENERATE}")
    stale = sorted(set(NOT_METRICS) - set(literals))
    assert not stale, f"NOT_METRICS entries no longer in the source: {stale}"


def test_catalog_keys_name_things_the_source_produces():
    """A typo in the catalog (a key no code produces) would document a metric that never appears: each key's last
    word must occur in the source that logs metrics."""
    source = "\n".join(path.read_text() for package in ("rlhf_core", "flows", "tasks")
                       for path in (ROOT / package).rglob("*.py") if path.name != "metrics_catalog.py")
    for key in METRICS:
        # held-out and training variants are made by prefixing (eval/, reward_model/eval_): check the base word
        word = re.sub(r"<[a-z_]+>", "", key).split("/")[-1].removeprefix("eval_").removesuffix("_s") \
            or key.split("/")[0]
        assert word in source, f"catalog key {key!r}: {word!r} occurs nowhere in rlhf_core/, flows/ or tasks/"


def test_every_config_field_is_described():
    """The UI form, `rlhf <flow> --help` and the configuration reference all show a field's description: each field
    of every flow (sections too, by their class docstring) has one."""
    from flows.cli import FLOWS
    from rlhf_core.config.fields import config_fields

    missing = [f"{name}: {field.name}" for name, flow in FLOWS.items()
               for field in config_fields(flow.config, flow.config())
               if not re.sub(r"^\((when [\w.]+ is set|each item of [\w.]+)\)", "", field.description).strip()]
    assert missing == [], f"fields without a description: {missing}"


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines (at most 220): move the detail into docs/"
    text = "\n".join(lines)
    assert "make demo   # sets up .venv" in text and "make test   # sets up .venv, then runs the test suite" in text


def slug(heading: str) -> str:
    """Python-Markdown's default toc slug (what mkdocs anchors are)."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", re.sub(r"<[^>]+>", "", value)).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_in_the_readme_resolves():
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"README.md links to {link}: {target} has no heading #{anchor}"


def layout_blocks() -> dict[str, str]:
    """docs/layout.md's tree: {top-level folder: its lines}."""
    text = (ROOT / "docs" / "layout.md").read_text()
    tree = re.search(r"```\n(.*?)```", text, re.S).group(1)
    blocks: dict[str, str] = {}
    current = None
    for line in tree.splitlines():
        match = re.match(r"^([a-z_]+)/\s", line)
        if match:
            current = match.group(1)
        if current:
            blocks[current] = blocks.get(current, "") + line + "\n"
    return blocks


def test_the_layout_page_names_every_source_file():
    blocks = layout_blocks()
    for folder in ("rlhf_core", "tasks", "flows", "bench", "scripts"):
        assert folder in blocks, f"docs/layout.md has no {folder}/ entry"
        files = [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
        unnamed = sorted(str(p.relative_to(ROOT)) for p in files
                         if not re.search(rf"(?<![\w.]){re.escape(p.name)}(?!\w)", blocks[folder]))
        assert not unnamed, f"docs/layout.md does not name {unnamed} under {folder}/"


def test_the_metric_check_refuses_an_uncatalogued_key(monkeypatch):
    from flows.tracking import Tracker

    logged = []

    class Client:
        def log_batch(self, run_id, metrics):
            logged.extend(m.key for m in metrics)

    tracker = Tracker.__new__(Tracker)
    tracker.run_id, tracker.client = "run", Client()
    monkeypatch.setenv("RLHF_CHECK_METRIC_NAMES", "1")
    with pytest.raises(ValueError, match=r"'loss/polcy'.*metrics_catalog"):
        tracker.log_metrics({"loss/policy": 1.0, "loss/polcy": 2.0}, step=0)
    assert logged == []  # nothing of the batch is logged
    tracker.log_metrics({"loss/policy": 1.0, "time/generation_s": 3.0}, step=0)
    monkeypatch.setenv("RLHF_CHECK_METRIC_NAMES", "0")
    tracker.log_metrics({"anything/else": 1.0}, step=0)
    assert logged == ["loss/policy", "time/generation_s", "anything/else"]


def test_descriptions_survive_markdown_and_list_defaults_show_in_the_form():
    """Prefect's form renders each description as markdown: a `<name>` outside a code span would vanish, a leading
    `>` would turn into a quote. And a list field's default must be in the schema, or the form shows an empty list
    although a default applies."""
    import html

    import markdown

    from flows.cli import FLOWS
    from rlhf_core.config.fields import config_fields

    lost = []
    for name, flow in FLOWS.items():
        for field in config_fields(flow.config, flow.config()):
            shown = html.unescape(re.sub(r"<[^>]+>", "", markdown.markdown(field.description)))
            if " ".join(shown.split()) != " ".join(field.description.replace("`", "").split()):
                lost.append(f"{name}: {field.name}")
        schema = flow.config.model_json_schema()
        for key, info in flow.config.model_fields.items():
            if "list" in str(info.annotation) and not info.is_required():
                assert "default" in schema["properties"][key], f"{name}: {key} shows no default in the form"
    assert lost == [], f"descriptions that markdown mangles: {lost}"
