"""VQAv2 answer normalisation, as the official evaluation defines it (Antol et al. 2015, `vqaEval.py`).

Three steps, in this order:
1. punctuation: `;/[]"{}()=+\\_->@`,?!` are deleted when the text has the mark next to a space (or a
   comma between digits, "1,000"), else replaced by a space; a period is deleted unless a digit follows
   (so "3.5" keeps it and "yes." loses it);
2. per word, lower-cased: number words zero..ten (and "none") become digits, the articles a / an / the
   are dropped;
3. a contraction written without one of its apostrophes gets it back ("dont" -> "don't",
   "couldnt've" -> "couldn't've"); apostrophes themselves are never removed.

The official table is a fixed list of such spellings; it is generated here from the contracted
forms: every spelling that lacks exactly one apostrophe maps to the form. Spellings that are ordinary
words ("well", "were", "its", "shed", "ill", "lets", "wed") are not in the official list and are not
produced here. Two of its entries are left out: capitalised keys ("Im", "Ive", "Id've") can never
match after lower-casing, and "somebody'd" -> "somebodyd" (the one entry that maps backwards).
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))

# Each contracted form whose apostrophe-less spellings the official table restores.
CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've "
    "y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in CONTRACTED:
        marks = [i for i, ch in enumerate(form) if ch == "'"]
        for i in marks:  # drop exactly one apostrophe
            table[form[:i] + form[i + 1:]] = form
    return table


CONTRACTIONS = _contraction_table()
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """Step 1 (the official `processPunctuation`)."""
    out = text
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the original text, as the official code does; the edit applies to `out`.
        if (p + " " in text or " " + p in text) or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def numbers_articles_contractions(text: str) -> str:
    """Steps 2 and 3 (the official `processDigitArticle`): words are re-joined with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize(text: str) -> str:
    """A raw answer → the string VQAv2 compares (newlines and tabs count as spaces)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return numbers_articles_contractions(strip_punctuation(text))
