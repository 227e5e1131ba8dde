"""Plotly theme, renderer and a few figure helpers shared by every notebook.

**Why a custom renderer.** Plotly's defaults lose figures in two common places (measured, see
DESIGN.md): under papermill the default ``plotly_mimetype`` writes only
``application/vnd.plotly.v1+json``, which ``nbconvert --to html`` drops silently; and the
``notebook`` renderer pulls MathJax from a CDN and pushes 4.8 MB of plotly.js into the notebook.
The ``lab`` renderer below emits *both* the plotly mimetype (JupyterLab and VS Code render it
natively) and a small ``text/html`` div that draws with ``window.Plotly`` (what nbconvert's HTML
uses). The book builder (``ci/book.py``) puts plotly.js, from the installed package, into each
page's ``<head>`` once, so the book opens offline; without it the div says how to get a figure.
"""

from __future__ import annotations

import sys
import uuid

# plotly's renderer module imports nbformat -> jsonschema, whose optional "iri" format checker
# (rfc3987_syntax) compiles a Lark grammar on import: measured 1.4-10 s inside a kernel on this
# machine, for a checker no notebook uses. Marking it absent makes jsonschema skip that checker.
sys.modules.setdefault("rfc3987_syntax", None)

import plotly.graph_objects as go  # noqa: E402 (after the sys.modules line above)
import plotly.io as pio  # noqa: E402
from plotly.io.base_renderers import MimetypeRenderer, PlotlyRenderer  # noqa: E402

# Fixed colours so a method has the same colour in every figure of the book.
PALETTE = {
    "baseline": "#7f7f7f",
    "ours": "#d62728",
    "paper": "#1f77b4",
    "accent": "#ff7f0e",
    "good": "#2ca02c",
    "purple": "#9467bd",
    "brown": "#8c564b",
    "pink": "#e377c2",
    "olive": "#bcbd22",
    "cyan": "#17becf",
}
SEQUENCE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

_lab_template = go.layout.Template(
    layout=dict(
        font=dict(family="Inter, Helvetica, Arial, sans-serif", size=13),
        colorway=SEQUENCE,
        margin=dict(l=60, r=20, t=60, b=50),
        hovermode="closest",
        legend=dict(bgcolor="rgba(255,255,255,0.6)"),
        title=dict(x=0.02, xanchor="left"),
    )
)


class LabRenderer(MimetypeRenderer):
    """Plotly mimetype for live frontends plus an offline-safe HTML div for exports."""

    def __init__(self, height: int | None = None):
        self.height = height

    def to_mimebundle(self, fig_dict):
        bundle = PlotlyRenderer(config={"displaylogo": False}).to_mimebundle(fig_dict)
        bundle["text/html"] = figure_div(fig_dict)
        return bundle


def figure_div(fig_dict: dict) -> str:
    """A div plus a script that draws the figure with ``window.Plotly`` if the page has it."""
    div_id = f"lab-plot-{uuid.uuid4().hex[:12]}"
    height = (fig_dict.get("layout") or {}).get("height") or 450
    payload = pio.to_json(fig_dict, validate=False)
    return (f'<div id="{div_id}" class="lab-plot" style="height:{height}px; width:100%;"></div>'
            f'<script type="text/javascript">(function() {{ var el = document.getElementById("{div_id}");'
            f" var fig = {payload};"
            ' if (window.Plotly) { Plotly.newPlot(el, fig.data, fig.layout, {displaylogo: false, responsive: true}); }'
            ' else { el.style.height = "auto"; el.textContent = "[plotly figure: open this page from make book,'
            ' or the notebook in JupyterLab, to see it]"; } })();</script>')


def use_lab_theme() -> None:
    """Register and select the ``lab`` template and renderer (idempotent)."""
    pio.templates["lab"] = _lab_template
    pio.templates.default = "plotly_white+lab"
    pio.renderers["lab"] = LabRenderer()
    pio.renderers.default = "lab"


def plotlyjs_script_tag() -> str:
    """plotly.js from the installed plotly package, as one inline <script> (for offline HTML)."""
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def figure(title: str = "", x: str = "", y: str = "", *, height: int = 420, **layout) -> go.Figure:
    """An empty figure with the lab's layout conventions: title and axis labels always set."""
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, **layout)
    return fig


def subplots(rows: int, cols: int, *, titles=(), height: int = 420, **kwargs) -> go.Figure:
    """``plotly.subplots.make_subplots`` with the lab's defaults."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles) or None, **kwargs)
    fig.update_layout(height=height)
    return fig


use_lab_theme()
