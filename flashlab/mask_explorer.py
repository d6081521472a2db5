"""Explorer: a real head under a mask, cut into tiles: the block mask, the K/V traffic, the attention map.

:class:`MaskView` draws, for one captured head (:mod:`flashlab.capture`), a mask and block sizes:

- left: the head's attention weights under the mask (log scale; masked entries white), with the tile
  grid on top;
- middle: the block mask (:func:`flashlab.masks.block_mask`): every tile empty, partial or full;
- right: K and V elements read from HBM, counted by :class:`flashlab.memory.MemoryModel` in FA2 runs
  of :func:`flashlab.flash.flash_attention` without a mask, with the causal mask, and with this one.

:func:`mask_figure` draws it once (static); :func:`mask_explorer` adds controls, as the explorers of
:mod:`flashlab.widgets` do.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure

from flashlab import capture, masks
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel
from flashlab.widgets import DPI, Explorer

MASKS = ("causal", "sliding window", "prefix-LM", "documents")
BLOCKS = (4, 8, 16, 32, 64)
CLASS_COLORS = ListedColormap(["#eeeeee", "tab:orange", "tab:blue"])  # empty, partial, full


def sentence_ids(tokens: list[str]) -> np.ndarray:
    """A document id per token: a new one starts after every token ending a sentence (. ? !)."""
    ends = np.array([t.rstrip().endswith((".", "?", "!")) for t in tokens], int)
    return np.concatenate([[0], np.cumsum(ends)[:-1]]).astype(int)


def mask_for(kind: str, tokens: list[str], window: int, prefix: int):
    """The mask function of ``kind`` (one of :data:`MASKS`) for a causal decoder over ``tokens``."""
    if kind == "causal":
        return masks.causal()
    if kind == "sliding window":
        return masks.sliding_window(window)
    if kind == "prefix-LM":
        return masks.prefix_lm(prefix)
    if kind == "documents":
        return masks.intersect(masks.document(sentence_ids(tokens)), masks.causal())
    raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {kind!r}")


def kv_reads(q, k, v, block_q: int, block_k: int, mask=None) -> int:
    """K and V elements an FA2 run reads from HBM (counted), for one head with grouped K/V."""
    memory = MemoryModel()
    flash_attention(q, k, v, mask=mask, block_q=block_q, block_k=block_k, memory=memory)
    return memory.read_elements.get("K", 0) + memory.read_elements.get("V", 0)


class MaskView:
    """The figure and its three axes; ``draw(**params)`` redraws for a head, a mask and block sizes."""

    def __init__(self, data: capture.Capture | None = None):
        self.data = data or capture.load()
        self.fig = Figure(figsize=(13, 4.2), dpi=DPI, layout="constrained")
        self.ax_map, self.ax_tiles, self.ax_bytes = self.fig.subplots(1, 3, width_ratios=[1, 1, 0.8])
        self.caption = ""

    def draw(
        self, prompt=0, layer=2, head=1, mask="sliding window", window=16, prefix=16, block_q=16, block_k=16
    ):
        data = self.data
        li = data.layers.index(layer)
        q = data.q[prompt][li, head : head + 1].astype(np.float32)
        kv_head = head // (data.q[prompt].shape[1] // data.k[prompt].shape[1])
        k, v = (x[prompt][li, kv_head : kv_head + 1].astype(np.float32) for x in (data.k, data.v))
        n = q.shape[-2]
        fn = mask_for(mask, data.tokens[prompt], window, prefix)
        visible = masks.dense(fn, n, n)
        s = np.where(
            visible, q[0].astype(np.float64) @ k[0].T.astype(np.float64) / np.sqrt(q.shape[-1]), -np.inf
        )
        with np.errstate(invalid="ignore"):  # a row that sees no key (prefix 0 never; kept general)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
        bm = masks.block_mask(fn, n, n, block_q, block_k)
        reads = {
            "no mask": kv_reads(q, k, v, block_q, block_k),
            "causal": kv_reads(q, k, v, block_q, block_k, masks.causal()),
            mask: kv_reads(q, k, v, block_q, block_k, fn),
        }
        for ax in (self.ax_map, self.ax_tiles, self.ax_bytes):
            ax.clear()
        self.ax_map.imshow(
            np.where(visible, p, np.nan), norm=LogNorm(1e-4, 1), cmap="viridis", interpolation="nearest"
        )
        self.ax_map.set_title(f"prompt {prompt}, layer {layer}, head {head}: weights ({mask})")
        self.ax_map.set_xticks(np.arange(0, n, block_k) - 0.5, minor=True)
        self.ax_map.set_yticks(np.arange(0, n, block_q) - 0.5, minor=True)
        self.ax_map.grid(which="minor", color="white", linewidth=0.5)
        self.ax_map.set_xlabel("key")
        self.ax_map.set_ylabel("query")
        self.ax_tiles.imshow(bm.classes, cmap=CLASS_COLORS, vmin=0, vmax=2, interpolation="nearest")
        counts = bm.counts()
        self.ax_tiles.set_title(
            f"{block_q} x {block_k} tiles: {counts['full']} full (blue), "
            f"{counts['partial']} partial (orange), {counts['empty']} empty",
            fontsize=9,
        )
        self.ax_tiles.set_xlabel("key block j")
        self.ax_tiles.set_ylabel("query block i")
        names = list(reads)
        self.ax_bytes.bar(
            names, [reads[x] for x in names], color=["tab:gray", "tab:blue", "tab:green"][: len(names)]
        )
        self.ax_bytes.set_title("K and V elements read (counted, FA2)")
        self.caption = (
            f"{mask}: {counts['empty']} of {bm.classes.size} tiles empty, never read; K/V reads "
            + ", ".join(f"{x} {reads[x]}" for x in names)
        )


def mask_figure(data: capture.Capture | None = None, **params) -> Figure:
    """The explorer's figure drawn once (parameters as :meth:`MaskView.draw`)."""
    view = MaskView(data)
    view.draw(**params)
    return view.fig


def mask_explorer(data: capture.Capture | None = None, **params) -> Explorer:
    """Controls for the prompt, layer, head, mask, window, prefix and block sizes over :class:`MaskView`."""
    view = MaskView(data)
    d = view.data
    p = dict(
        prompt=0,
        layer=d.layers[0],
        head=1,
        mask="sliding window",
        window=16,
        prefix=16,
        block_q=16,
        block_k=16,
    )
    p |= params
    style = {"description_width": "70px"}
    controls = {
        "prompt": widgets.Dropdown(
            options=list(range(len(d.q))), value=p["prompt"], description="prompt", style=style
        ),
        "layer": widgets.Dropdown(options=list(d.layers), value=p["layer"], description="layer", style=style),
        "head": widgets.IntSlider(
            value=p["head"], min=0, max=d.q[0].shape[1] - 1, description="head", style=style
        ),
        "mask": widgets.Dropdown(options=MASKS, value=p["mask"], description="mask", style=style),
        "window": widgets.IntSlider(value=p["window"], min=1, max=64, description="window", style=style),
        "prefix": widgets.IntSlider(value=p["prefix"], min=0, max=64, description="prefix", style=style),
        "block_q": widgets.SelectionSlider(
            options=BLOCKS, value=p["block_q"], description="B_r", style=style
        ),
        "block_k": widgets.SelectionSlider(
            options=BLOCKS, value=p["block_k"], description="B_c", style=style
        ),
    }
    c = controls
    rows = [
        widgets.HBox([c["prompt"], c["layer"], c["head"]]),
        widgets.HBox([c["mask"], c["window"], c["prefix"]]),
        widgets.HBox([c["block_q"], c["block_k"]]),
    ]
    return Explorer(view, controls, rows, css_class="flashlab-mask-explorer", label="Mask explorer")
