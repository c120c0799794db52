"""A pure-Python stand-in for the tokenisation step of the COCO caption toolkit (pycocoevalcap).

The toolkit runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` (Java) on every caption and then
drops the tokens in its PUNCTUATIONS list. This module re-states the rules of that lexer (PTBLexer.flex) that
captions meet, with the lexer's own matching discipline: at each position the longest match wins (trailing context
counts towards the length) and ties go to the rule listed first. Rare constructs outside captions (SGML, phone
numbers, emoticons, sentence-final abbreviation lists) are not covered.
"""

import re


# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after tokenisation. Lower-casing happens first, so
# "-LRB-" never matches and parentheses survive as "-lrb-" / "-rrb-", as in the toolkit.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]

# Python's \w also holds numeric characters such as "½" or "²" that Java counts as neither letter nor digit.
_NOT_LETTER_OR_DIGIT = "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f"
_LETTER = r"[^\W\d_" + _NOT_LETTER_OR_DIGIT + "]"
_ALNUM = r"[^\W_" + _NOT_LETTER_OR_DIGIT + "]"
_APOS = "['\u0092\u2019]"
_APOS_ETC = "['\u0092\u2019`\u0091\u2018\u201b]"
_HYPHEN = "[-_/\u058a\u2010\u2011]"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"

# Fractions written as one character become digits (normalizeFractions).
_FRACTION_CHARACTERS = {
    "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3", "\u2155": "1/5",
    "\u2156": "2/5", "\u2157": "3/5", "\u2158": "4/5", "\u2159": "1/6", "\u215a": "5/6", "\u215b": "1/8",
    "\u215c": "3/8", "\u215d": "5/8", "\u215e": "7/8",
}  # fmt: skip
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u00a3": "#", "\u20ac": "$", "\u00a2": "cents"}


# Abbreviations that keep their period (PTBLexer's ABBREV1/ABBREV2 lists). The lexer matches words case-insensitively
# except where the flex file brackets the first letter ("[M]iss"), to keep common words such as "miss." or "ill." apart.
_ABBREVIATIONS = (
    r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|calif|colo|conn|ct|dak"
    r"|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|pp?t[ye]s?|ltd"
    r"|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg|mr|mrs"
    r"|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon"
    r"|brig|co?mdr|pfc|spc|supts?|det|mt|ft|m|mm|mme|mmes|mlle|mlles|vs|alex|wm|jos|cie|cf|treas|ph|invt|elec|natl"
    r"|m[ft]g|dept)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\."
)


def _word(text, before, after):
    return [text]


def _split_at(cut):
    return lambda text, before, after: [text[:cut], text[cut:]]


def _contraction(text, before, after):
    return [text.replace("\u2019", "'").replace("\u0092", "'")]


def _fraction(text, before, after):
    return [re.sub(r"[ ]", "\u00a0", text)]


def _double_quote(text, before, after):
    # Opening when the previous character is a space or an opening bracket (or the line starts).
    return ["``" if before == "" or before in " \t\u00a0([{" else "''"]


def _single_quote(text, before, after):
    if text in ("\u2018", "\u0091"):
        return ["`"]
    if text in ("\u2019", "\u0092"):
        return ["'"]
    return ["`" if (before == "" or before in " \t\u00a0([{\"") and after[:1] not in ("", " ") else "'"]


def _dashes(text, before, after):
    return ["--"]


def _ellipsis(text, before, after):
    return ["..."]


def _bracket(text, before, after):
    return [_BRACKETS[text]]


def _currency(text, before, after):
    return [_CURRENCY.get(text, text)]


# A single letter and its period split only before one of these capitalised sentence starters (found by probing the
# Java lexer: "x a. The y" gives "a .", "x a. Bob y" gives "a.").
_SENTENCE_STARTERS = re.compile(
    "[ \t\u00a0\n]+(?:A|A(?i:n|s|t|bout|fter)|B(?i:ut)|H(?i:e|er|ere|owever)|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore)"
    "|N(?i:ow)|O(?i:ne|ur|nce|ther)|S(?i:he|o|ome|ince|uch)|T(?i:hat|he|heir|here|hese|hey|his|hen)|W(?i:e|hat|hen"
    "|hile)|Y(?i:ou|et))(?=\\s|$)"
)


def _single_letter_abbreviation(text, before, after):
    return [text[:-1], "."] if _SENTENCE_STARTERS.match(after) else [text]


# (name, pattern, trailing context or None, action), in the lexer's priority order for equally long matches.
_RULES = [
    ("cannot", r"(?i:cannot)", None, _split_at(3)),
    ("gonna", r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _split_at(3)),
    ("tis", r"(?i:['\u2019]t(?:is|was))\b", None, lambda t, b, a: [t[:2].replace("\u2019", "'"), t[2:]]),
    ("sword", r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", r"(?i:n" + _APOS_ETC + "t)", _word),
    ("sredaux", r"(?i:n" + _APOS_ETC + "t)", None, _contraction),
    ("word_redaux", _LETTER + "(?:" + _ALNUM + r")*", _APOS + r"(?i:[msd]|re|ve|ll)(?!" + _LETTER + ")", _word),
    ("redaux", _APOS + r"(?i:[msd]|re|ve|ll)", r"(?!" + _LETTER + ")", _contraction),
    (
        "apoword",
        _APOS + "n" + _APOS + "?|[lLdDjJ]" + _APOS + "|" + _APOS + "em|[A-HJ-XZn]" + _APOS_ETC + _LETTER + "{2,}"
        + "|" + _APOS + "[2-9]0s|" + _APOS + "till?|" + _LETTER + "+[aeiouyAEIOUY]" + _APOS_ETC + "[aeiouA-Z]"
        + _LETTER + "*|" + _APOS + "cause|cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|ol" + _APOS,
        None,
        _word,
    ),
    ("apoword2", "[yY]" + _APOS, None, _word),
    ("url", r"(?i:https?)://[^\s\"<>|()]+[^\s\"<>|.!?(){},-]", None, _word),
    ("email", r"[a-zA-Z0-9][^\s\"<>|(){}]*@(?:[^\s\"<>|(){}.]+\.)*[^\s\"<>|(){}\[\].,;:]+", None, _word),
    ("twitter", r"@[a-zA-Z_][a-zA-Z_0-9]*|#" + _LETTER + "(?:" + _ALNUM + ")*", None, _word),
    ("acronym", r"[A-Za-z](?:\.[A-Za-z])+\.", None, _word),
    ("abbreviation", _ABBREVIATIONS, None, _word),
    ("number_abbreviation", r"(?i:no)\.", r"[ \t]*\d", _word),
    ("letter_abbreviation", r"[A-Za-z]\.", None, _single_letter_abbreviation),
    ("fraction_character", "[" + "".join(_FRACTION_CHARACTERS) + "]", None, lambda t, b, a: [_FRACTION_CHARACTERS[t]]),
    ("sgml", r"</?[A-Za-z!][^>\s]*>", None, _word),
    ("word", _LETTER + "(?:" + _ALNUM + ")*(?:[.!?]" + _LETTER + "(?:" + _ALNUM + ")*)*", None, _word),
    ("date", r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", None, _word),
    ("number", r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)", None, _word),
    ("fraction", r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, _fraction),
    ("thinga", r"[A-Z]+(?:[+&][A-Z]+)+", None, _word),
    ("hthing", r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-[A-Za-z0-9\u00ad]+)+", None, _word),
    (
        "thing",
        "(?:[dDoOlL]" + _APOS_ETC + _ALNUM + ")?" + _ALNUM + "+(?:" + _HYPHEN + "(?:[dDoOlL]" + _APOS_ETC + _ALNUM
        + ")?" + _ALNUM + "+)*",
        None,
        _word,
    ),
    ("ellipsis", r"\.\.\.|\u2026", None, _ellipsis),
    ("dashes", r"--+|[\u2013\u2014\u2015]", None, _dashes),
    ("latex_quotes", r"``|''", None, _word),
    ("double_quote", "[\"\u201c\u201d\u0093\u0094]", None, _double_quote),
    ("single_quote", "['`\u2018\u2019\u0091\u0092]", None, _single_quote),
    ("bracket", r"[()\[\]{}]", None, _bracket),
    ("exclamations", r"[?!]+", None, _word),
    ("repeated_symbols", r"\*+|#+|_+|<<|>>", None, _word),
    ("currency", "[A-Z]*\\$|[\u00a3\u20ac\u00a2]", None, _currency),
    ("symbol", r"[^\s]", None, _word),
]
_COMPILED = [
    (re.compile(pattern), re.compile(trailing) if trailing else None, action) for _, pattern, trailing, action in _RULES
]
_SPACES = re.compile(r"[^\S\n]+")


def _tokenize_lines(text: str) -> list:
    """Token lists of the lines of `text`. Lines are tokenised as one stream, as the toolkit hands all captions to
    Java in one file: the end of a caption can depend on how the next one starts."""
    lines = [[]]
    position = 0
    while position < len(text):
        if text[position] == "\n":
            lines.append([])
            position += 1
            continue
        spaces = _SPACES.match(text, position)
        if spaces:
            position = spaces.end()
            continue
        best_length, best = 0, None
        for pattern, trailing, action in _COMPILED:
            match = pattern.match(text, position)
            if match is None or match.end() == position:
                continue
            length = match.end() - position
            if trailing is not None:
                context = trailing.match(text, match.end())
                if context is None:
                    continue
                length += context.end() - match.end()
            if length > best_length:
                best_length, best = length, (match.end(), action)
        end, action = best
        before = text[position - 1] if position else ""
        lines[-1].extend(action(text[position:end], " " if before == "\n" else before, text[end:]))
        position = end
    return lines


def ptb_tokenize_captions(captions: list) -> list:
    """The captions as the toolkit's PTBTokenizer.tokenize returns them, in the same order: lower-cased tokens joined
    by single spaces, punctuation tokens removed. Pass the captions in the order the toolkit would write them (all
    references image by image, or all predictions), since a caption's last token can depend on the next caption."""
    text = "\n".join(caption.replace("\n", " ") for caption in captions)
    return [
        " ".join(token.lower() for token in tokens if token.lower() not in PUNCTUATIONS)
        for tokens in _tokenize_lines(text)
    ]


def ptb_tokenize(caption: str) -> str:
    """One caption tokenised on its own (as the toolkit would if it were the last or only caption)."""
    return ptb_tokenize_captions([caption])[0]
