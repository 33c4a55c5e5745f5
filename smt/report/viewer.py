"""The report's image pages: a comparison viewer per image, thumbnails, and the galleries that list them.

Every page is static HTML beside the report (``reports/report/``) and reads the full-resolution images where the
pipeline left them (HR under ``data.root``, each method's output under ``results/``; bicubic, which no stage
writes, is saved here), by relative links, so the pages work from ``file://`` with no server and no network.
PNGs are written by Pillow from the same pixels with the same settings, so a rerun writes the same bytes.

Scale: one viewer page per image (the page loads that image's files only), thumbnails lazy-loaded, the index shows
at most ``INDEX_THUMBS`` per split and the galleries are paginated (``GALLERY_PAGE`` thumbnails a page).
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from smt.data.images import write_png
from smt.report.assets import CSS, TABLE_JS, VIEWER_JS

__all__ = ["ImageEntry", "write_image_pages", "rel", "page_head", "thumbs_html", "INDEX_THUMBS", "GALLERY_PAGE",
           "THUMB_SIZE"]

INDEX_THUMBS = 12  # per split on the index page; the rest are in the galleries
GALLERY_PAGE = 60  # thumbnails per gallery page
THUMB_SIZE = 160
# inline, so that the thumbnails keep their layout on the notebook's page too (which has not our stylesheet)
_THUMB_A = f"display:block;width:{THUMB_SIZE}px;font-size:.8em;text-decoration:none"
_THUMB_IMG = (f"display:block;width:{THUMB_SIZE}px;height:{THUMB_SIZE * 3 // 4}px;object-fit:contain;"
              "background:#eee;border:1px solid #ccc")


@dataclass
class ImageEntry:
    """One image of one split: where its versions are (absolute paths) and their scores on it."""

    split: str
    id: str
    source: str
    width: int
    height: int
    versions: dict[str, Path] = field(default_factory=dict)  # name (HR, bicubic, method) -> PNG
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (PSNR-Y, colour shift)

    @property
    def page(self) -> str:  # relative to the report folder
        return f"view/{self.split}/{self.id}.html"

    @property
    def thumb(self) -> str:
        return f"thumbs/{self.split}/{self.id}.png"


def rel(target: str | Path, page_dir: str | Path) -> str:
    """The relative URL of ``target`` from a page in ``page_dir`` (POSIX separators, as a browser wants)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())).as_posix()


def page_head(title: str, assets: str) -> str:
    """``<!DOCTYPE html>`` up to ``<body>``: UTF-8, the title and the shared stylesheet at ``assets/report.css``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="stylesheet" href="{assets}/report.css"></head><body>\n')


def write_thumbnail(src: Path, out: Path, size: int = THUMB_SIZE) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        write_png(out, np.asarray(im))


def thumbs_html(entries: list[ImageEntry], prefix: str, scores_of: str | None) -> str:
    """Lazy-loaded thumbnails, each opening its viewer; captioned ``split/id (source)`` and, when ``scores_of``
    names a scored version, its PSNR-Y gain over bicubic. ``prefix``: the report folder seen from the page."""
    items = []
    for e in entries:
        gain = ""
        if scores_of and scores_of in e.scores and "bicubic" in e.scores:
            gain = f"<br>{scores_of} {e.scores[scores_of][0] - e.scores['bicubic'][0]:+.2f} dB over bicubic"
        src = f" ({html.escape(e.source)})" if e.source else ""
        items.append(f'<a href="{prefix}{e.page}" style="{_THUMB_A}"><img loading="lazy" src="{prefix}{e.thumb}" '
                     f'alt="{html.escape(e.split)}/{html.escape(e.id)}" style="{_THUMB_IMG}">'
                     f'{html.escape(e.split)}/{html.escape(e.id)}{src}{gain}</a>')
    return f'<div class="thumbs" style="display:flex;flex-wrap:wrap;gap:.6em">{"".join(items)}</div>'


def _viewer_page(e: ImageEntry, report_dir: Path, prev: ImageEntry | None, nxt: ImageEntry | None,
                 final: str | None) -> str:
    page_dir = report_dir / Path(e.page).parent
    names = list(e.versions)
    choices = [{"name": n, "src": rel(path, page_dir),
                "psnr_y": round(e.scores[n][0], 4) if n in e.scores else None,
                "color_shift": round(e.scores[n][1], 4) if n in e.scores else None} for n, path in e.versions.items()]
    # left of the slider: the final method; right: bicubic (or HR where there is no bicubic)
    left = names.index(final) if final in names else len(names) - 1
    right = names.index("bicubic") if "bicubic" in names else 0
    data = {"choices": choices, "left": left, "right": right, "width": e.width, "height": e.height,
            "prev": f"../../{prev.page}" if prev else None, "next": f"../../{nxt.page}" if nxt else None}
    nav = " &middot; ".join(x for x in (
        f'<a href="../../{prev.page}">&larr; {html.escape(prev.split)}/{html.escape(prev.id)}</a>' if prev else "",
        '<a href="../../../index.html">index</a>', '<a href="../../report.html">evaluation report</a>',
        f'<a href="../../{nxt.page}">{html.escape(nxt.split)}/{html.escape(nxt.id)} &rarr;</a>' if nxt else "") if x)
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{i + 1}</td>"
        + (f"<td>{c['psnr_y']:.2f}</td><td>{c['color_shift']:.2f}</td>" if c["psnr_y"] is not None
           else '<td colspan="2">reference</td>' if c["name"] == "HR" else '<td colspan="2">no HR to score</td>')
        + "</tr>" for i, c in enumerate(choices))
    source = f" ({html.escape(e.source)})" if e.source else ""
    return (page_head(f"{e.split}/{e.id}: comparison", "../../assets")
            + f"<p>{nav}</p>\n<h1>{html.escape(e.split)}/{html.escape(e.id)}{source}, {e.width}&times;{e.height}</h1>\n"
            '<div class="viewer-bar"><label>left <select id="selA"></select></label>'
            '<button id="swap" title="s or space">swap</button>'
            '<label>right <select id="selB"></select></label>'
            '<button id="fit" title="f">fit</button><button id="actual" title="0">100%</button>'
            '<span>zoom <b id="zoom">100%</b></span></div>\n'
            '<input id="slider" type="range" min="0" max="1000" value="500" aria-label="slider position">\n'
            '<div id="stage" class="stage"><div id="layer" class="layer">'
            f'<img id="imgB" alt="right choice" width="{e.width}" height="{e.height}">'
            f'<img id="imgA" alt="left choice" width="{e.width}" height="{e.height}"></div>'
            '<div id="line" class="split-line"></div><span id="tagA" class="tag" style="left:.3em"></span>'
            '<span id="tagB" class="tag" style="right:.3em"></span></div>\n'
            '<p class="keys">Keys: <b>1</b>&ndash;<b>9</b> left image, <b>Shift</b>/<b>Alt</b>+digit right image, '
            '<b>&larr;</b>/<b>&rarr;</b> move the slider, <b>Shift</b>+arrows pan, <b>+</b>/<b>&minus;</b> or the '
            'wheel zoom, <b>f</b> fit, <b>0</b> 100%, <b>s</b> or space swap, <b>n</b>/<b>p</b> next/previous image. '
            'Drag to pan; Shift+drag moves the slider. Both sides share one zoom and pan.</p>\n'
            '<table><thead><tr><th>version</th><th>key</th><th>PSNR-Y (dB)</th><th>colour shift</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>\n"
            '<p class="note">PSNR-Y and colour shift of this image (challenge protocol; colour shift: the largest over '
            "R, G, B of |mean(SR &minus; HR)| in grey levels).</p>\n"
            f"<script>window.VIEWER = {json.dumps(data)};</script>\n"
            '<script src="../../assets/viewer.js"></script>\n</body></html>\n')


def _gallery_pages(entries: list[ImageEntry], report_dir: Path, final: str | None) -> list[str]:
    pages = []
    chunks = [entries[i:i + GALLERY_PAGE] for i in range(0, len(entries), GALLERY_PAGE)] or [[]]
    for k, chunk in enumerate(chunks):
        name = f"gallery_{k + 1}.html"
        links = " ".join(f'<a href="gallery_{j + 1}.html">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>"
                         for j in range(len(chunks)))
        body = (page_head(f"All images, page {k + 1}", "assets")
                + f'<p><a href="../index.html">index</a> &middot; <a href="report.html">evaluation report</a></p>\n'
                + f"<h1>All images ({len(entries)}), page {k + 1} of {len(chunks)}</h1>\n<p>Pages: {links}</p>\n"
                + thumbs_html(chunk, "", final) + "\n</body></html>\n")
        (report_dir / name).write_text(body)
        pages.append(name)
    return pages


def write_image_pages(entries: list[ImageEntry], report_dir: str | Path, final: str | None) -> list[str]:
    """Write the assets, a thumbnail and a viewer page per entry and the galleries; returns the gallery pages.
    ``entries`` in display order (validation, then test); ``versions`` must point at existing PNGs."""
    report_dir = Path(report_dir)
    assets = report_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "report.css").write_text(CSS)
    (assets / "viewer.js").write_text(VIEWER_JS)
    (assets / "table.js").write_text(TABLE_JS)
    for i, e in enumerate(entries):
        first = e.versions.get("HR") or next(iter(e.versions.values()))
        write_thumbnail(first, report_dir / e.thumb)
        page = report_dir / e.page
        page.parent.mkdir(parents=True, exist_ok=True)
        prev = entries[i - 1] if i > 0 else None
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        page.write_text(_viewer_page(e, report_dir, prev, nxt, final))
    return _gallery_pages(entries, report_dir, final)
