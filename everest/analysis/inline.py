"""The report with its figures inlined as base64 data URIs, for viewers where its relative image links resolve
nowhere (the Prefect UI)."""

from __future__ import annotations

import base64
import mimetypes
import re
from io import BytesIO
from pathlib import Path

# A Markdown image ``![alt](path)`` (alt text may hold balanced brackets; a path without spaces or title).
_IMAGE = re.compile(r"!\[(?P<alt>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target>[^)\s]+)\)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, data:, ...: nothing to embed


def embed_figures(markdown: str, base_dir: Path, max_width_px: int | None = 1600) -> str:
    """``markdown`` with every local image inlined as a base64 data URI, for viewers where the report's relative
    links resolve nowhere (the Prefect UI).

    Image paths are relative to ``base_dir`` (the report's folder); a missing file becomes the text
    '(figure <name> not found)' instead of a broken image; URLs are left alone, and so is all other text.
    PNGs are embedded scaled down to at most ``max_width_px`` wide with a 256-colour palette (a full 9-target
    report's figures shrink from about 2.4 to 1 MB of base64 at 1600 px); ``None`` embeds the files byte for
    byte. The files themselves are never changed.
    """
    if max_width_px is not None and (isinstance(max_width_px, bool) or not isinstance(max_width_px, int)
                                     or max_width_px < 1):
        raise ValueError(f"max_width_px must be a positive integer or None, got {max_width_px!r}")

    def inline(m: re.Match[str]) -> str:
        if _URL.match(m["target"]):
            return m[0]
        path = Path(base_dir) / m["target"]
        if not path.is_file():
            return f"(figure {path.name} not found)"
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = path.read_bytes()
        if max_width_px is not None and mime == "image/png":
            data = _smaller_png(data, max_width_px)
        return f"![{m['alt']}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE.sub(inline, markdown)


def _smaller_png(png: bytes, max_width_px: int) -> bytes:
    """The PNG scaled down to at most ``max_width_px`` wide (aspect kept) and re-encoded with a 256-colour
    palette: plots have few colours, so it looks the same at a third of the bytes (scaling alone saves little:
    smoothed pixels compress worse)."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(BytesIO(png)) as source:
        image = source.convert("RGB")
    if image.width > max_width_px:
        height = max(1, round(image.height * max_width_px / image.width))
        image = image.resize((max_width_px, height), Image.Resampling.LANCZOS)
    out = BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, format="PNG",
                                                                                          optimize=True)
    return out.getvalue()
