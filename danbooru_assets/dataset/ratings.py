"""One rating vocabulary for every Danbooru release.

Danbooru's rating letters changed meaning in 2022, when "safe" was split into "general"
and "sensitive". The tables store a word, the letter as written (``rating_raw``) and the
era it was read in (``rating_era``):

==========  ==========================================  ==============================
era         where                                       letters
==========  ==========================================  ==============================
before_2022 Danbooru2017–2021 dumps (``tags`` as a      s safe, q questionable, e explicit
            list of objects, numbers often as strings)
since_2022  the live API (``tag_string_*``, ints)       g general, s sensitive, q questionable, e explicit
==========  ==========================================  ==============================

An API-form file without a single ``g`` is read in the ``before_2022`` era instead (a 2021
mirror in the API's shape; ``convert_metadata_to_shards`` decides it per file).

``safe`` stays its own word: a pre-2022 ``s`` post is general or sensitive and the dump does
not say which. Settings rules name words (:data:`RATING_WORDS`); a letter there is refused
(:func:`letter_message`) because ``s`` means "safe" in one era and "sensitive" in the other.
"""

from __future__ import annotations

from typing import Any

ERA_BEFORE_2022 = "before_2022"
ERA_SINCE_2022 = "since_2022"
RATING_LETTERS = {
    ERA_BEFORE_2022: {"s": "safe", "q": "questionable", "e": "explicit"},
    ERA_SINCE_2022: {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"},
}
RATING_WORDS = ("general", "sensitive", "questionable", "explicit", "safe")


def rating_word(raw: Any, era: str) -> str | None:
    """The vocabulary word for a rating as a release wrote it (a letter of its era, or a
    word), ``None`` when it is none of them."""
    if type(raw) is not str:
        return None
    text = raw.strip().lower()
    if text in RATING_WORDS:
        return text
    return RATING_LETTERS[era].get(text)


def letter_message(letters: list[str]) -> str:
    """What old rating letters in a settings file mean now, as an error message."""
    meanings = {
        "g": "general (since 2022)",
        "s": "sensitive (since 2022) or safe (before 2022: Danbooru2017-2021's s, general and sensitive together)",
        "q": "questionable",
        "e": "explicit",
    }
    said = "; ".join(f"{letter!r} means {meanings[letter]}" for letter in letters)
    return (
        f"rating letters are no longer accepted: their meaning changed in 2022. {said}. "
        f"Write the words: {', '.join(RATING_WORDS)}"
    )
