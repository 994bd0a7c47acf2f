"""The report's drawing helpers, shared by its plots (`report`, `answer_figures`).

matplotlib is imported inside `new_axes` (the service imports this package without it) and
drawn through the object-oriented ``Figure`` API on the Agg canvas, leaving pyplot's global
backend state untouched. A figure becomes an ``<img>`` with an inline base64 PNG, so the page
needs no external fetch.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CORRECT", "WRONG", "finish", "new_axes", "png"]

CORRECT, WRONG = "#1f77b4", "#d62728"


def png(fig: Figure) -> str:
    """Render a figure to an ``<img>`` tag with an inline base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="">'


def new_axes() -> tuple[Figure, Axes]:
    """A fresh figure on its own Agg canvas (no pyplot, so no global backend switch)."""
    # Lazy by design: only the report needs matplotlib, and the service must import without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def finish(
    fig: Figure,
    ax: Axes,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    legend: Mapping[str, Any],
) -> str:
    """Label the plot, draw its legend (`legend`: keywords for `Axes.legend`), then render the
    figure with `png`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**legend)
    return png(fig)
