"""Text normalisation and the one rendering of a product into the text the encoder sees."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections.abc import Mapping

_TAG = re.compile(r"<[^>]{0,200}>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w]+")


def normalize_text(text: str) -> str:
    """NFKC, HTML entities and tags removed, control characters dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    if "<" in text or "&" in text:
        text = _TAG.sub(" ", html.unescape(text))
    text = _CONTROL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def title_key(title: str) -> str:
    """The normalised title used by the variant-group rule: case, punctuation and spacing folded."""
    return _SPACE.sub(" ", _NON_WORD.sub(" ", title.casefold())).strip()


def query_id_from_text(text: str) -> str:
    """A stable id for sources that identify queries only by their text (Home Depot)."""
    key = _SPACE.sub(" ", text.casefold()).strip()
    return "q" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def render_product_text(
    title: str,
    *,
    brand: str | None = None,
    category: str | None = None,
    attributes: Mapping[str, str] | None = None,
    description: str | None = None,
    max_chars: int = 512,
) -> str:
    """Title first, then brand, category, attributes and description, cut at ``max_chars``.

    METHOD.md "Encoder": products are rendered as plain text (title, then attributes and
    description, truncated). The title always survives the cut.
    """
    parts = [title]
    if brand:
        parts.append(f"Brand: {brand}")
    if category:
        parts.append(f"Category: {category}")
    if attributes:
        parts.append("; ".join(f"{k}: {v}" for k, v in attributes.items() if v))
    if description:
        parts.append(description)
    text = "\n".join(p for p in parts if p)
    if len(text) > max_chars:
        text = text[: max(max_chars, len(title))].rstrip()
    return text
