"""CJK font discovery for matplotlib figures (Chinese titles), from pip packages or system fonts."""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import matplotlib
from matplotlib import font_manager, ft2font

logger = logging.getLogger(__name__)

#: How to get a CJK font when none is found (pip works without root, e.g. on PAI-DSW).
CJK_FONT_INSTALL_HINT = (
    "pip install pylopdf-fonts-zh-cn  "
    "(or, as root on Debian/Ubuntu: apt-get install -y fonts-noto-cjk)"
)

# A font must have all of these to be used: common characters of product titles.
_PROBE_CHARS = "连衣裙帽子裤鞋衬衫外套"

# Families drawn with Simplified Chinese glyph shapes come first; a Pan-CJK
# font's JP/TC/KR face has the characters too, but some look foreign to a
# mainland reader, so those are only a fallback.
_PREFERRED_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "PingFang SC",
    "Sarasa Gothic SC",
    "SimHei",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Serif CJK SC",
    "Noto Serif SC",
)

# pip packages that ship CJK fonts as plain files (found without importing them).
_FONT_PACKAGES = ("pylopdf_fonts_zh_cn", "mplfonts")
_FONT_SUFFIXES = (".otf", ".ttf", ".ttc")
_REGULAR_STYLES = ("regular", "normal", "book", "roman")

_warned_no_font = False


# ---------------------------------------------------------------- fonts


def _package_font_files() -> list[str]:
    """Font files shipped inside the known pip packages, if installed."""
    files = []
    for name in _FONT_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            files.extend(
                str(p) for p in sorted(Path(root).rglob("*")) if p.suffix.lower() in _FONT_SUFFIXES
            )
    return files


def _candidate_font_files() -> list[str]:
    """All font files worth probing: pip-shipped first, then matplotlib's list, then the system's."""
    files = _package_font_files()
    files += [entry.fname for entry in font_manager.fontManager.ttflist]
    # matplotlib caches its font list; a font installed after the cache was
    # written (e.g. apt-get install in a running notebook) is only seen here.
    files += font_manager.findSystemFonts()
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _has_cjk_glyphs(font: ft2font.FT2Font) -> bool:
    glyphs = [font.get_char_index(ord(ch)) for ch in _PROBE_CHARS]
    # Distinct glyphs, not just mapped ones: fallback fonts such as matplotlib's
    # "Last Resort" map every ideograph to one placeholder box.
    return all(glyphs) and len(set(glyphs)) == len(glyphs)


def _cjk_faces(path: str) -> list[tuple[int, str, str]]:
    """``(face_index, family, style)`` of each face of ``path`` that has glyphs for all probe characters."""
    try:
        font = ft2font.FT2Font(path)
    except (OSError, RuntimeError, ValueError):
        return []
    faces = [(0, font.family_name, font.style_name)] if _has_cjk_glyphs(font) else []
    # A .ttc holds several faces, e.g. Debian's NotoSansCJK-Regular.ttc has
    # JP first and SC third. matplotlib < 3.10 can only use the first one.
    for index in range(1, font.num_faces):
        try:
            face = ft2font.FT2Font(path, face_index=index)
        except TypeError:
            break
        except (OSError, RuntimeError, ValueError):
            continue
        if _has_cjk_glyphs(face):
            faces.append((index, face.family_name, face.style_name))
    return faces


@functools.lru_cache(maxsize=1)
def _find_cjk_font() -> tuple[str, int, str] | None:
    """Pick the best CJK font face; returns ``(path, face_index, family)`` or ``None``. Cached."""
    found = []
    for order, path in enumerate(_candidate_font_files()):
        for index, family, style in _cjk_faces(path):
            rank = _PREFERRED_FAMILIES.index(family) if family in _PREFERRED_FAMILIES else len(_PREFERRED_FAMILIES)
            # The regular weight of a family, not its bold file that happens to be listed first.
            not_regular = style.lower() not in _REGULAR_STYLES
            found.append((rank, not_regular, order, index, path, family))
    if not found:
        return None
    *_, index, path, family = min(found)
    return path, index, family


def _registered_name(path: str, index: int, fallback: str) -> str:
    """Register ``path`` with matplotlib and return the family name matplotlib knows face ``index`` by."""

    def entries() -> list:
        return [e for e in font_manager.fontManager.ttflist if e.fname == path]

    if not entries():
        font_manager.fontManager.addfont(path)
    for entry in entries():
        if getattr(entry, "index", 0) == index:
            return entry.name
    return fallback


def setup_cjk_font() -> str | None:
    """Make matplotlib draw Chinese text with an installed CJK font.

    Looks for a font with glyphs for common product-title characters (in the
    ``pylopdf-fonts-zh-cn`` or ``mplfonts`` pip packages, matplotlib's font
    list, and the system's font folders), preferring Simplified Chinese
    families. The chosen font is registered with matplotlib, put first in
    ``rcParams["font.sans-serif"]``, ``font.family`` is set to sans-serif, and
    ``axes.unicode_minus`` is turned off. The search runs once per process;
    the rcParams are set again on every call (cheap), so a reset by
    ``rcdefaults()`` or a style is undone by the next figure.

    Returns:
        The font family name, or ``None`` when no CJK font is installed. Then a
        warning with the install command is logged (once per process) and
        figures still render, with boxes in place of Chinese characters.
    """
    global _warned_no_font
    found = _find_cjk_font()
    if found is None:
        if not _warned_no_font:
            _warned_no_font = True
            logger.warning(
                "No font with Chinese glyphs found: Chinese text in figures will show as boxes. "
                "Install one with: %s, then restart the kernel.",
                CJK_FONT_INSTALL_HINT,
            )
        return None
    path, index, family = found
    name = _registered_name(path, index, family)
    rc = matplotlib.rcParams
    rc["font.sans-serif"] = [name] + [f for f in rc["font.sans-serif"] if f != name]
    rc["font.family"] = ["sans-serif"]
    # Not every CJK font has U+2212 MINUS SIGN; an ASCII hyphen always renders.
    rc["axes.unicode_minus"] = False
    return name
