"""`dvc plots show` draws its charts without the internet, from the page `make install` writes.

The project's dvc.yaml in a git + DVC workspace (conftest), three epochs of curves, a confusion
matrix and two PNGs in reports/, the Makefile's own rule for the page (alexops.plots_page) and the
real `dvc`: DVC's default page loads vega from a CDN; the configured one holds it inline, loads
nothing, and headless Chromium (where installed), with every host name unresolvable, draws the
charts from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO, VENV_BIN, run
from PIL import Image

from alexops import plots_page
from alexops.errors import AlexopsError

PAGE = ".dvc/tmp/offline-plots.html"  # the Makefile's PLOTS_PAGE
STAMP = ".venv/.installed-stamp"  # the Makefile's install, taken as done (make -o)
CHARTS = ("loss", "accuracy", "confusion")  # dvc.yaml's vega plots
HISTORY = """epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds
1,0.9,0.6,0.8,0.65,0.01,1.0
2,0.5,0.8,0.6,0.75,0.02,1.0
3,0.25,0.9,0.45,0.85,0.01,1.0
"""
# a folder dataset's class names may be anything: the page says it is UTF-8; class 0 sorts last by name
CONFUSION = """actual,predicted,actual_index,predicted_index
"Écharpe","Écharpe",0,0
"Écharpe","Bag",0,1
"Bag","Bag",1,1
"""
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def write_reports(workspace) -> None:
    dataset = yaml.safe_load((workspace / "params.yaml").read_text())["base"]["dataset"]
    reports = workspace / "reports" / dataset
    reports.mkdir(parents=True)
    (reports / "train_history.csv").write_text(HISTORY)
    (reports / "confusion.csv").write_text(CONFUSION, encoding="utf-8")
    for name in ("confusion.png", "curves.png"):
        Image.new("RGB", (8, 8), "white").save(reports / name)


def make_page(workspace, env, *flags: str) -> subprocess.CompletedProcess:
    """The Makefile's own rule for the page, in `workspace`, its install taken as done."""
    return run(
        ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", STAMP, f"BIN={VENV_BIN}",
         *flags, PAGE],
        workspace, env, check=not flags,
    )  # fmt: skip


def plots_show(workspace, env, out: str) -> str:
    run([f"{VENV_BIN}/dvc", "plots", "show", "-o", out], workspace, env)
    return (workspace / out / "index.html").read_text(encoding="utf-8")


def test_dvc_plots_page_holds_vega_inline_and_loads_nothing(workspace, ws_env):
    write_reports(workspace)

    # no `make install` yet: DVC's own page, vega from the CDN
    default = plots_show(workspace, ws_env, "default")
    assert REMOTE_SCRIPT.search(default) and "cdn.jsdelivr.net" in default

    make_page(workspace, ws_env)
    local = (workspace / ".dvc" / "config.local").read_text()
    assert re.search(r"html_template\s*=\s*tmp/offline-plots.html", local), local
    status = run(["git", "status", "--porcelain", "--ignored=no", "--", ".dvc"], workspace).stdout
    assert not status, f"git would hold the machine's page or config:\n{status}"

    html = plots_show(workspace, ws_env, "offline")
    assert not REMOTE_SCRIPT.search(html) and "cdn.jsdelivr.net" not in html
    assert "{plot_divs}" not in html and "{refresh_tag}" not in html and "{scripts}" not in html
    template = (workspace / PAGE).read_text(encoding="utf-8")
    head = template[: template.index("{refresh_tag}")]
    bundle = template[template.index("<script>") : template.index("</script>")]
    assert len(bundle) > 500_000 and "window.vegaEmbed=" in bundle
    assert html.startswith(head) and html.count(bundle) == 1 and html.count("<script>") == 1
    for chart in CHARTS:
        assert f"vegaEmbed('#{chart}', spec);" in html
    assert html.count('<img src="static/') == 2  # the two PNGs

    # deleted, the page is written again by the next `make install` (DVC would fail without it)
    (workspace / PAGE).unlink()
    assert make_page(workspace, ws_env, "-q").returncode == 1


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium to draw the page with")
def test_the_offline_page_draws_every_chart_with_no_network(workspace, ws_env):
    write_reports(workspace)
    make_page(workspace, ws_env)
    drawn = draw(workspace, ws_env, "offline")
    assert set(drawn) == set(CHARTS), f"vega-embed ran on {sorted(drawn)}"
    # vega's SVG names every point it drew
    assert 'aria-label="epoch: 3; loss: 0.25; rev: workspace; field: train_loss"' in drawn["loss"]
    assert 'aria-label="epoch: 3; accuracy: 0.85; rev: workspace; field: val_accuracy"' in drawn["accuracy"]
    confusion = drawn["confusion"]
    assert 'aria-label="predicted: Bag; actual: Écharpe; share of the row: 50%; images: 1"' in confusion
    for axis in ("X-axis titled 'predicted'", "Y-axis titled 'actual'"):  # the dataset's order, not by name
        assert f"{axis} for a discrete scale with 2 values: Écharpe, Bag" in confusion
    assert "<input" not in confusion  # counts are drawn on the cells: no bare showValues checkbox
    assert "for strokeDash with 2 values: train_loss, val_loss" in drawn["loss"]  # the legend

    # no validation hold-out (train.val_size 0): the val_* columns are NaN, and the curves show
    # only what was measured, with no empty legend entry
    dataset = yaml.safe_load((workspace / "params.yaml").read_text())["base"]["dataset"]
    history = workspace / "reports" / dataset / "train_history.csv"
    history.write_text(re.sub(r"^(\d+,[^,]+,[^,]+),[^,]+,[^,]+,", r"\1,nan,nan,", HISTORY, flags=re.M))
    drawn = draw(workspace, ws_env, "no-validation")
    for chart, measured in (("loss", "train_loss"), ("accuracy", "train_accuracy")):
        assert f"for strokeDash with 1 value: {measured}" in drawn[chart], drawn[chart][-2000:]
        assert "val_" not in drawn[chart]


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium to draw the page with")
def test_dvc_plots_diff_draws_an_unchanged_curve_thin_over_thick(workspace, ws_env):
    write_reports(workspace)
    make_page(workspace, ws_env)
    run(["git", "add", "reports"], workspace)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "reports"], workspace)
    # the workspace against HEAD: the same curves, which the later revision's line used to hide
    drawn = draw(workspace, ws_env, "diff", "diff", "HEAD")
    lines = re.findall(r'aria-roledescription="line mark"[^>]*stroke="([^"]+)"[^>]*stroke-width="([^"]+)"',
                       drawn["loss"])  # fmt: skip
    # train and val for each revision: the workspace's first and thick, then HEAD's thin on top
    assert [float(width) for _, width in lines] == [5, 5, 1.5, 1.5], lines
    assert len({colour for colour, _ in lines}) == 2  # the revisions' colours
    # the offline page's CSS finds DVC's box of PNGs by its inline `white-space: nowrap`
    from dvc_render.image import ImageRenderer

    assert "nowrap" in ImageRenderer.DIV


def draw(workspace, env, out: str, *command: str) -> dict[str, str]:
    """`dvc plots show -o out` (or another `dvc plots` command) drawn by headless Chromium with
    every host name unresolvable: each chart's SVG, by name."""
    if command:
        run([f"{VENV_BIN}/dvc", "plots", *command, "-o", out], workspace, env)
    else:
        plots_show(workspace, env, out)
    page = (workspace / out / "index.html").as_uri()
    dom = run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--virtual-time-budget=5000", "--dump-dom", page],
        workspace, env,
    ).stdout  # fmt: skip
    charts = re.split(r'<div id="(\w+)" class="vega-embed', dom)
    return {name: body for name, body in zip(charts[1::2], charts[2::2], strict=True)}


def test_page_escapes_a_script_end_and_refuses_a_placeholder_in_the_bundle():
    html = plots_page.page('window.x = "</script><b>";', "test bundle")
    assert 'window.x = "<\\/script><b>";' in html and html.count("</script>") == 1
    assert html.count("{plot_divs}") == 1 and html.count("{refresh_tag}") == 1
    assert "{scripts}" not in html
    for placeholder in plots_page.PLACEHOLDERS:
        with pytest.raises(AlexopsError, match=re.escape(placeholder)):
            plots_page.page(f"var s = '{placeholder}';", "test bundle")
