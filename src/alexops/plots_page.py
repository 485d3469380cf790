"""`python -m alexops.plots_page PATH`: a page template for `dvc plots show` and `dvc plots diff`
whose charts draw offline.

DVC renders its charts with vega, vega-lite and vega-embed, and its default page loads them from
cdn.jsdelivr.net: on a machine without the internet the charts stay blank and only the PNGs show.
This writes a page template (DVC's `plots.html_template`, or `dvc plots show --html-template`)
that holds the three libraries inline instead. They come from the `vl-convert-python` package
(`vl_convert.javascript_bundle()`, the bundle Altair uses for its offline HTML): one classic
script of about 900 KB that sets `window.vegaEmbed`, `vegaLite` and `vega`, with no import and
no URL to fetch. Every page DVC then writes holds that bundle (a page of PNGs too).

The template is DVC's own page (`dvc_render.html.PAGE_HTML`: `{refresh_tag}`, a title, the table
spacing, `{plot_divs}`) with that script where DVC's has `{scripts}`, the placeholder DVC
replaces with its CDN `<script src>` tags; having none, the page loads nothing from the network.
It also says it is UTF-8, as DVC writes it: the bundle and class names need not be ASCII.
DVC fills the template with `str.replace`, so the bundle must not hold a placeholder itself:
`page` refuses one that does.

`make install` writes it to .dvc/tmp/offline-plots.html (git-ignored by DVC) and sets it in
.dvc/config.local, this machine's own DVC settings. DVC reads a configured template that is
missing as the template's text, and then stops with "HTML template has to contain
'{plot_divs}'": `make install` writes it again, and `dvc config --local --unset
plots.html_template` goes back to DVC's CDN page.

Errors (AlexopsError, exit 2): vl-convert-python missing or failing, a bundle that holds a
placeholder, a path that cannot be written. The file is written atomically (alexops.files).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from alexops import files
from alexops.errors import AlexopsError

# The Vega-Lite release the bundle carries: DVC's chart templates are Vega-Lite 5 specs (its
# CDN page loads vega-lite 5.2.0), so the last 5.x rather than vl-convert's default 6.x. vega
# and vega-embed are vl-convert's (6.2 and 7.0, DVC's CDN 5.20 and 6.18): Vega-Lite compiles
# to the vega it is bundled with; tests/test_plots_offline.py draws DVC's charts with them.
VEGA_LITE = "5.21"
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what DVC's HTML.embed replaces
SCRIPT_END = re.compile(r"</(script)", re.IGNORECASE)  # would end the inline <script> early

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
// @@ABOUT@@: inline, so that the charts draw without the internet (alexops.plots_page)
(function () {
"use strict";
@@BUNDLE@@
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
        /* DVC's box of PNGs, one per revision, keeps them on one line (nowrap): two 800 px
           figures scrolled sideways. Here the name takes a line and the revisions share the
           next one equally, each figure scaled down to its share (never up). */
        div[style*="nowrap"] {
            display: flex;
            flex-wrap: wrap;
            justify-content: center;
        }
        div[style*="nowrap"] > p {
            flex-basis: 100%;
        }
        div[style*="nowrap"] > div {
            flex: 1 1 0;
            min-width: 0;
            max-width: max-content;
        }
        div[style*="nowrap"] img {
            max-width: 100%;
            height: auto;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def bundle() -> tuple[str, str]:
    """vega, vega-lite and vega-embed as one script, and a line naming their versions."""
    try:
        import vl_convert
    except ImportError as exc:
        raise AlexopsError(f"vl-convert-python is not installed ({exc}). Fix: run `make install`.") from exc
    try:
        script = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
        about = (
            f"vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, "
            f"vega-embed {vl_convert.get_vega_embed_version()} "
            f"from vl-convert-python {metadata.version('vl-convert-python')}"
        )
    except (RuntimeError, ValueError) as exc:
        raise AlexopsError(
            f"vl-convert-python could not bundle vega-lite {VEGA_LITE}: {exc}. "
            "Fix: install the version constraints.txt pins (`make install`)."
        ) from exc
    return script, about


def page(script: str, about: str) -> str:
    """The page template holding `script` inline.

    The script runs in a strict-mode function, as the module it was bundled from would: its
    top-level names stay its own, so none clashes with the `var spec` of DVC's chart divs.
    """
    found = [p for p in PLACEHOLDERS if p in script or p in about]
    if found:
        raise AlexopsError(
            f"the vega bundle ({about}) holds {', '.join(found)}, which DVC would replace in it. "
            "Fix: pin another vl-convert-python in constraints.txt."
        )
    script = SCRIPT_END.sub(r"<\\/\1", script)  # `<\/script` means the same in a string or regex
    return PAGE.replace("@@ABOUT@@", about).replace("@@BUNDLE@@", script)


def write(target: Path) -> str:
    """Write the template to `target` atomically; return the line naming the bundle."""
    script, about = bundle()
    files.write_text(target, page(script, about))
    return about


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m alexops.plots_page PATH", file=sys.stderr)
        return 2
    try:
        about = write(Path(args[0]))
    except AlexopsError as exc:
        print(f"plots_page: error: {exc}", file=sys.stderr)
        return 2
    print(f"plots_page: {args[0]}: {about}, inline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
