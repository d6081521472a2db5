"""The bridge between matplotlib and ipywidgets: a figure as PNG bytes, an explorer as widget + figure.

An explorer shows its view's figure as PNG in an ``ipywidgets.Image`` and redraws it on every control
change, so it needs nothing beyond ipywidgets in plain JupyterLab. Displayed, its output carries both
the widget and the PNG of its first figure: JupyterLab shows the widget, a static renderer the figure
(nbconvert's HTML export prefers widget views to images unless told otherwise: ``make html`` ranks
images first, see ``HTML_COMMAND`` in ``tests/test_browser.py``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import ipywidgets as widgets
from matplotlib.figure import Figure

DPI = 80
BUTTONS = {"button_width": "60px"}  # a toggle's buttons, on one line


def png_bytes(fig: Figure) -> bytes:
    """The figure rendered to PNG (Agg, the figure's own dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


class Explorer:
    """Controls and a view's figure shown as an ``ipywidgets.Image``; a control change redraws it.

    ``controls`` maps each parameter of ``view.draw`` to the widget holding its value; ``rows`` lays
    the widgets out; ``follow(name, params)`` may return new values for other controls after control
    ``name`` changed (set before the one redraw). ``css_class`` marks the outer box (the browser test
    finds the explorer by it). Under the figure, a text line repeats ``view.caption`` (what the figure
    shows, in words: readable without the picture, and set after the picture, so it also says that a
    redraw has arrived).
    """

    def __init__(
        self,
        view,
        controls: dict[str, widgets.ValueWidget],
        rows: list[widgets.Widget],
        *,
        css_class: str,
        label: str,
        follow: Callable[[str, dict], dict] | None = None,
    ):
        self.view, self.controls, self.label, self.follow = view, controls, label, follow
        view.draw(**self.params())
        width = int(view.fig.get_figwidth() * view.fig.dpi)
        self.image = widgets.Image(value=png_bytes(view.fig), format="png", layout={"width": f"{width}px"})
        self.status = widgets.Label(value=view.caption)
        self.status.add_class("flashlab-status")
        self.widget = widgets.VBox([*rows, self.image, self.status])
        self.widget.add_class(css_class)
        self._quiet = False
        for name, control in controls.items():
            control.observe(lambda change, name=name: self._changed(name), names="value")

    def params(self) -> dict:
        """The current value of every control, by parameter name."""
        return {name: control.value for name, control in self.controls.items()}

    def _changed(self, name: str) -> None:
        if self._quiet:
            return
        if self.follow is not None:
            self._quiet = True
            try:
                for other, value in self.follow(name, self.params()).items():
                    self.controls[other].value = value
            finally:
                self._quiet = False
        self.redraw()

    def redraw(self) -> None:
        """Redraw the view's data for the current control values and refresh the image."""
        self.view.draw(**self.params())
        self.image.value = png_bytes(self.view.fig)
        self.status.value = self.view.caption

    def _repr_mimebundle_(self, **kwargs) -> dict:
        data = self.widget._repr_mimebundle_(**kwargs)
        data["image/png"] = base64.b64encode(self.image.value).decode("ascii")
        data["text/plain"] = f"{self.label} (interactive in JupyterLab; this is its static figure)"
        return data
