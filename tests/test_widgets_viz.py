"""companion.widgets.explore and companion.viz: testable without a browser."""

import json

import ipywidgets as W
import plotly.graph_objects as go
import pytest

from companion import viz
from companion.widgets import explore


def make_fig(n=3, kind="line", big=False):
    fig = go.Figure(go.Scatter(y=list(range(n)), mode="lines" if kind == "line" else "markers"))
    fig.update_layout(height=600 if big else 300)
    return fig


def test_explorer_starts_at_defaults_and_follows_the_controls(monkeypatch):
    monkeypatch.setenv("LAB_HEADLESS", "1")
    ex = explore(make_fig, n=(1, 10), kind=["line", "markers"], big=False)
    assert ex.params == {"n": 3, "kind": "line", "big": False}
    assert list(ex.figure.data[0].y) == [0, 1, 2]
    new = ex.update(n=5, kind="markers")
    assert list(new.data[0].y) == [0, 1, 2, 3, 4] and new.data[0].mode == "markers"
    assert isinstance(ex.controls["n"], W.IntSlider) and isinstance(ex.controls["kind"], W.Dropdown)
    assert isinstance(ex.controls["big"], W.Checkbox)


def test_explorer_accepts_widgets_and_float_sliders(monkeypatch):
    monkeypatch.setenv("LAB_HEADLESS", "0")
    ex = explore(lambda scale=0.5: make_fig(n=int(10 * scale)), scale=(0.1, 1.0, 0.1))
    assert isinstance(ex.controls["scale"], W.FloatSlider)
    ex2 = explore(make_fig, n=W.IntSlider(value=7, min=1, max=9))
    assert len(ex2.figure.data[0].y) == 7


def test_make_fig_errors_are_shown_not_lost(monkeypatch):
    monkeypatch.setenv("LAB_HEADLESS", "1")

    def fragile(n=1):
        if n > 5:
            raise RuntimeError("too big")
        return make_fig(n=n)

    ex = explore(fragile, n=(1, 10))
    ex.update(n=8)
    assert "too big" in ex.status.value
    assert len(ex.figure.data[0].y) == 1  # the last good figure stays


@pytest.mark.parametrize("controls, message", [
    (dict(), "at least one control"),
    (dict(m=(1, 3)), "not parameters of make_fig"),
    (dict(n=(5, 1)), "min must be < max"),
    (dict(n=(10, 20)), "outside its slider"),
    (dict(n=object()), "expected an ipywidget"),
])
def test_bad_explorers_raise_value_error(controls, message):
    with pytest.raises(ValueError, match=message):
        explore(make_fig, **controls)


def test_make_fig_must_return_a_figure():
    with pytest.raises(ValueError, match="go.Figure"):
        explore(lambda n=1: {"data": []}, n=(1, 3))


def test_lab_renderer_emits_mimetype_and_offline_html():
    viz.use_lab_theme()
    fig = make_fig(n=4)
    bundle = fig._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle, "JupyterLab / VS Code render the plotly mimetype"
    html = bundle["text/html"]
    assert "window.Plotly" in html and "Plotly.newPlot" in html
    assert "cdn" not in html.lower() and "<script src" not in html, "no network in the HTML fallback"
    payload = html.split("var fig = ", 1)[1].split("; if (window.Plotly)", 1)[0]
    assert json.loads(payload)["data"][0]["y"] == [0, 1, 2, 3]


def test_plotlyjs_tag_is_inline_and_complete():
    tag = viz.plotlyjs_script_tag()
    assert tag.startswith("<script") and "src=" not in tag[:40] and len(tag) > 1_000_000
