"""``explore(make_fig, **controls)``: the one way notebooks build an interactive figure.

The figure comes from a *pure* function ``make_fig(**params) -> go.Figure``. That keeps the
interaction testable without a browser (call ``make_fig`` with other values and compare).

Two display modes:

* **live** (JupyterLab, VS Code): the controls and an ``ipywidgets.Output`` area that holds the
  figure; moving a control redraws it there. (A plain display-id update does *not* work here:
  JupyterLab ignores ``update_display_data`` sent from a widget callback, checked in Chromium.)
* **headless** (``LAB_HEADLESS=1``, set by ``ci.run_notebooks`` and ``ci.book``): papermill saves no
  widget state, so the default figure is displayed as an ordinary plotly output, with a note
  naming the controls and their defaults.

Controls may be ipywidgets, or shorthands::

    explore(make_fig, step=(0, 2000, 100),          # int slider (min, max, step)
            zipf=(0.8, 1.4, 0.1),                    # float slider
            optimizer=["adam", "coupled"],           # dropdown
            show_mu=True)                            # checkbox

``make_fig`` should be fast (well under a second): run the experiment first, then let
``make_fig`` select and draw.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from companion.runtime import is_headless


def _to_widget(name: str, spec: Any) -> W.ValueWidget:
    if isinstance(spec, W.ValueWidget):
        widget = spec
    elif isinstance(spec, bool):
        widget = W.Checkbox(value=spec)
    elif isinstance(spec, tuple) and len(spec) in (2, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec
    ):
        lo, hi = spec[0], spec[1]
        if lo >= hi:
            raise ValueError(f"control {name}={spec!r}: min must be < max")
        if all(isinstance(v, int) for v in spec):
            widget = W.IntSlider(min=lo, max=hi, step=spec[2] if len(spec) == 3 else 1, value=lo)
        else:
            step = spec[2] if len(spec) == 3 else (hi - lo) / 20
            widget = W.FloatSlider(min=lo, max=hi, step=step, value=lo)
    elif isinstance(spec, (list, tuple)) and len(spec) > 0:
        widget = W.Dropdown(options=list(spec))
    else:
        raise ValueError(
            f"control {name}={spec!r}: expected an ipywidget, a (min, max[, step]) tuple, "
            "a non-empty list of options, or a bool"
        )
    widget.description = widget.description or name
    widget.style = {"description_width": "initial"}
    return widget


class Explorer:
    """Controls plus a figure that follows them. ``update(**params)`` is what a slider move does."""

    def __init__(self, make_fig: Callable[..., go.Figure], controls: dict[str, W.ValueWidget]):
        self.make_fig = make_fig
        self.controls = controls
        self.status = W.HTML()
        self.output = W.Output()
        self.figure = self._render()
        for widget in controls.values():
            widget.observe(self._on_change, names="value")

    @property
    def params(self) -> dict[str, Any]:
        return {name: w.value for name, w in self.controls.items()}

    def _render(self) -> go.Figure:
        fig = self.make_fig(**self.params)
        if not isinstance(fig, go.Figure):
            raise ValueError(f"make_fig must return a plotly go.Figure, got {type(fig).__name__}")
        return fig

    def _on_change(self, _change) -> None:
        try:
            self.figure = self._render()
            self.status.value = ""
        except Exception as exc:  # show the error next to the controls instead of losing it
            self.status.value = f"<span style='color:#b00'>make_fig failed: {exc!r}</span>"
            return
        self._draw()

    def _draw(self) -> None:
        from IPython.display import display

        with self.output:
            self.output.clear_output(wait=True)
            display(self.figure)

    def update(self, **params) -> go.Figure:
        """Set controls programmatically (as a person would) and return the new figure."""
        for name, value in params.items():
            if name not in self.controls:
                raise ValueError(f"unknown control {name!r}; controls are {sorted(self.controls)}")
            self.controls[name].value = value
        return self.figure

    def show(self) -> None:
        from IPython.display import HTML, display

        if is_headless():
            names = ", ".join(f"{n} = {w.value!r}" for n, w in self.controls.items())
            display(HTML(f"<p><i>Interactive figure shown at its defaults ({names}). "
                         "Open the notebook in JupyterLab to move the controls.</i></p>"))
            display(self.figure)
        else:
            display(W.VBox([W.HBox(list(self.controls.values())), self.status, self.output]))
            self._draw()

    def _ipython_display_(self) -> None:
        """Already shown by ``explore``; returning an Explorer as a cell's last value adds nothing."""


def explore(make_fig: Callable[..., go.Figure], **controls: Any) -> Explorer:
    """Display ``make_fig(**defaults)`` with controls that redraw it. Returns the :class:`Explorer`."""
    if not callable(make_fig):
        raise ValueError(f"make_fig must be callable, got {type(make_fig).__name__}")
    if not controls:
        raise ValueError("explore needs at least one control, e.g. explore(make_fig, step=(0, 100, 10))")
    accepted = inspect.signature(make_fig).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [n for n in controls if n not in accepted and not takes_kwargs]
    if unknown:
        raise ValueError(f"controls {unknown} are not parameters of make_fig{inspect.signature(make_fig)}")
    widgets = {name: _to_widget(name, spec) for name, spec in controls.items()}
    for name, widget in widgets.items():  # start at make_fig's own default where it has one
        default = accepted[name].default if name in accepted else inspect.Parameter.empty
        if default is not inspect.Parameter.empty and not isinstance(controls[name], W.ValueWidget):
            if isinstance(widget, (W.IntSlider, W.FloatSlider)) and not widget.min <= default <= widget.max:
                raise ValueError(f"make_fig's default {name}={default!r} is outside its slider "
                                 f"[{widget.min}, {widget.max}]")
            try:
                widget.value = default
            except Exception as exc:
                raise ValueError(f"make_fig's default {name}={default!r} is not a valid value for "
                                 f"its control {controls[name]!r}") from exc
    explorer = Explorer(make_fig, widgets)
    explorer.show()
    return explorer
