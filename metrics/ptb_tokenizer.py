"""A pure-Python stand-in for the tokenisation step of the COCO caption toolkit (pycocoevalcap).

The toolkit runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` (Java) on every caption and then
drops the tokens in its PUNCTUATIONS list. This module re-states the rules of that lexer (PTBLexer.flex) that
captions meet, with the lexer's own matching discipline: at each position the longest match wins (trailing context
counts towards the length) and ties go to the rule listed first. Rare constructs outside captions (SGML, phone
numbers, sentence-final abbreviation lists) are not covered.
"""

import re


# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after tokenisation. Lower-casing happens first, so
# "-LRB-" never matches and parentheses survive as "-lrb-" / "-rrb-", as in the toolkit.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]

# Characters the Java lexer cannot tokenise: with its default option (untokenizable=firstDelete) it deletes them, and
# they separate tokens as a space would ("a pizza🍕slice" -> "a pizza slice"). Found by running the toolkit's jar on
# "a X b" for every BMP character X (tests/fixtures/make_coco_caption_symbols_fixture.py): control and format
# characters, private use, characters unassigned in the lexer's (pre-2014) Unicode tables or added since, and many
# symbols outside the ranges the lexer lists. The lexer reads UTF-16 code units, so every character beyond the BMP (emoji, flags, skin
# tones, mathematical letters) is two untokenisable surrogates and is deleted too. Java's own spaces are in the list.
_UNTOKENIZABLE = (
    "\u0000-\u0009\u000e-\u0020\u007f\u0081-\u0084\u0086-\u0090\u0095\u0098-\u00a0\u037f-\u0383\u038b\u038d\u03a2"
    "\u0482\u0488-\u0489\u0528-\u0530\u0557-\u0558\u0560\u0588\u058a-\u0590\u05c8-\u05cf\u05eb-\u05ef\u05f5-\u05ff"
    "\u0604-\u0605\u060d-\u0613\u061c-\u061d\u065f\u066b-\u066c\u070e\u07b2-\u07bf\u07f9\u07fb-\u07ff\u0816-\u0819"
    "\u081b-\u0823\u0825-\u0827\u0829-\u083f\u0859-\u089f\u08a1\u08ad-\u08ff\u093a-\u093b\u094f\u0956-\u0957\u0970"
    "\u0978\u0980\u0984\u098d-\u098e\u0991-\u0992\u09a9\u09b1\u09b3-\u09b5\u09ba-\u09bb\u09c5-\u09c6\u09c9-\u09ca"
    "\u09cf-\u09d6\u09d8-\u09db\u09de\u09e4-\u09e5\u09f2-\u0a00\u0a04\u0a0b-\u0a0e\u0a11-\u0a12\u0a29\u0a31\u0a34"
    "\u0a37\u0a3a-\u0a3b\u0a3d\u0a50-\u0a58\u0a5d\u0a5f-\u0a65\u0a70-\u0a71\u0a75-\u0a80\u0a84\u0a8e\u0a92\u0aa9"
    "\u0ab1\u0ab4\u0aba-\u0abb\u0ad1-\u0adf\u0ae2-\u0ae5\u0af0-\u0b04\u0b0d-\u0b0e\u0b11-\u0b12\u0b29\u0b31\u0b34"
    "\u0b3a-\u0b3c\u0b3e-\u0b5b\u0b5e\u0b62-\u0b65\u0b70\u0b72-\u0b81\u0b84\u0b8b-\u0b8d\u0b91\u0b96-\u0b98\u0b9b"
    "\u0b9d\u0ba0-\u0ba2\u0ba5-\u0ba7\u0bab-\u0bad\u0bba-\u0bbd\u0bc3-\u0bc5\u0bc9\u0bce-\u0bcf\u0bd1-\u0be5"
    "\u0bf0-\u0c00\u0c04\u0c0d\u0c11\u0c29\u0c34\u0c3a-\u0c3c\u0c57\u0c5a-\u0c5f\u0c62-\u0c65\u0c70-\u0c84\u0c8d"
    "\u0c91\u0ca9\u0cb4\u0cba-\u0cbc\u0cbe-\u0cdd\u0cdf\u0ce2-\u0ce5\u0cf0\u0cf3-\u0d04\u0d0d\u0d11\u0d3b-\u0d3c"
    "\u0d45\u0d49-\u0d4d\u0d4f-\u0d5f\u0d62-\u0d65\u0d70-\u0d79\u0d80-\u0d84\u0d97-\u0d99\u0db2\u0dbc\u0dbe-\u0dbf"
    "\u0dc7-\u0e00\u0e3b-\u0e3e\u0e5a-\u0e80\u0e83\u0e85-\u0e86\u0e89\u0e8b-\u0e8c\u0e8e-\u0e93\u0e98\u0ea0\u0ea4"
    "\u0ea6\u0ea8-\u0ea9\u0eac\u0ebe-\u0ebf\u0ec5\u0ec7\u0ece-\u0ecf\u0eda-\u0edb\u0ee0-\u0eff\u0f01-\u0f1f"
    "\u0f2a-\u0f3f\u0f48\u0f6d-\u0f87\u0f8d-\u0fff\u102b-\u103e\u104a-\u104f\u1056-\u1059\u105e-\u1060\u1062-\u1064"
    "\u1067-\u106d\u1071-\u1074\u1082-\u108d\u108f\u109a-\u109f\u10c6\u10c8-\u10cc\u10ce-\u10cf\u10fb\u1249"
    "\u124e-\u124f\u1257\u1259\u125e-\u125f\u1289\u128e-\u128f\u12b1\u12b6-\u12b7\u12bf\u12c1\u12c6-\u12c7\u12d7"
    "\u1311\u1316-\u1317\u135b-\u137f\u1390-\u139f\u13f5-\u1400\u166d-\u166e\u1680\u169b-\u169f\u16eb-\u16ff\u170d"
    "\u1712-\u171f\u1732-\u173f\u1752-\u175f\u176d\u1771-\u177f\u17b4-\u17d6\u17d8-\u17db\u17dd-\u17df\u17ea-\u180f"
    "\u181a-\u181f\u1878-\u187f\u18a9\u18ab-\u18af\u18f6-\u18ff\u191d-\u1945\u196e-\u196f\u1975-\u197f\u19ac-\u19c0"
    "\u19c8-\u19cf\u19da-\u19ff\u1a17-\u1a1f\u1a55-\u1a7f\u1a8a-\u1a8f\u1a9a-\u1aa6\u1aa8-\u1b04\u1b34-\u1b44"
    "\u1b4c-\u1b4f\u1b5a-\u1b82\u1ba1-\u1bad\u1be6-\u1bff\u1c24-\u1c3f\u1c4a-\u1c4c\u1c7e-\u1ce8\u1ced\u1cf2-\u1cf4"
    "\u1cf7-\u1cff\u1dc0-\u1dff\u1f16-\u1f17\u1f1e-\u1f1f\u1f46-\u1f47\u1f4e-\u1f4f\u1f58\u1f5a\u1f5c\u1f5e"
    "\u1f7e-\u1f7f\u1fb5\u1fbf-\u1fc1\u1fc5\u1fcd-\u1fcf\u1fd4-\u1fd5\u1fdc-\u1fdf\u1fed-\u1ff1\u1ff5\u1ffd-\u2012"
    "\u2024-\u2025\u2027\u202a-\u202f\u203c-\u203d\u2043\u2045-\u206f\u2072-\u2073\u208f\u209d-\u209f\u20a1-\u20a3"
    "\u20a5-\u20ab\u20ad-\u20ff\u2150-\u2152\u215f-\u2182\u2185-\u218f\u2c2f\u2c5f\u2ce5-\u2cea\u2cef-\u2cf1"
    "\u2cf4-\u2cff\u2d26\u2d28-\u2d2c\u2d2e-\u2d2f\u2d68-\u2d6e\u2d70-\u2d7f\u2d97-\u2d9f\u2da7\u2daf\u2db7\u2dbf"
    "\u2dc7\u2dcf\u2dd7\u2ddf-\u2e2e\u2e30-\u3000\u3003-\u3004\u3007-\u3011\u3013-\u3030\u3036-\u303a\u303d-\u3040"
    "\u3097-\u309c\u30a0\u3100-\u3104\u312e-\u3130\u318f-\u319f\u31bb-\u31ef\u3200-\u33ff\u4db6-\u4dff\u9fcd-\u9fff"
    "\ua48d-\ua4cf\ua4fe-\ua4ff\ua60d-\ua60f\ua62c-\ua63f\ua66f-\ua67e\ua698-\ua69f\ua6e6-\ua716\ua720-\ua721"
    "\ua789-\ua78a\ua78f\ua794-\ua79f\ua7ab-\ua7f7\ua802\ua806\ua80b\ua823-\ua83f\ua874-\ua881\ua8b4-\ua8cf"
    "\ua8da-\ua8f1\ua8f8-\ua8fa\ua8fc-\ua8ff\ua926-\ua92f\ua947-\ua95f\ua97d-\ua983\ua9b3-\ua9ce\ua9da-\ua9ff"
    "\uaa29-\uaa3f\uaa43\uaa4c-\uaa4f\uaa5a-\uaa5f\uaa77-\uaa79\uaa7b-\uaa7f\uaab0\uaab2-\uaab4\uaab7-\uaab8"
    "\uaabe-\uaabf\uaac1\uaac3-\uaada\uaade-\uaadf\uaaeb-\uaaf1\uaaf5-\uab00\uab07-\uab08\uab0f-\uab10\uab17-\uab1f"
    "\uab27\uab2f-\uabbf\uabe3-\uabef\uabfa-\uabff\ud7a4-\ud7af\ud7c7-\ud7ca\ud7fc-\ud7ff\ue000-\uf8ff\ufa6e-\ufa6f"
    "\ufada-\ufaff\ufb07-\ufb12\ufb18-\ufb1c\ufb1e\ufb29\ufb37\ufb3d\ufb3f\ufb42\ufb45\ufbb2-\ufbd2\ufd3e-\ufd4f"
    "\ufd90-\ufd91\ufdc8-\ufdef\ufdfc-\ufe6f\ufe75\ufefd-\uff00\uffbf-\uffc1\uffc8-\uffc9\uffd0-\uffd1\uffd8-\uffd9"
    "\uffdd-\uffdf\uffe2-\uffe4\uffe7-\uffff"
    "\U00010000-\U0010ffff"
)
# Python's \w also holds numeric characters such as "½", "²" or "①" that Java counts as neither letter nor digit.
_NOT_LETTER_OR_DIGIT = (
    "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u249b\u24ea-\u24ff\u2776-\u2793" + _UNTOKENIZABLE
)
# ...and lacks characters that the lexer's LETTER class lists: combining marks, modifier letters and a few symbols that
# Java keeps inside a word ("a\u0301b" is one token). Found by the same probe ("aXb" and " Xb" stay one token).
_EXTRA_LETTERS = (
    "\u0040\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02eb\u02ed\u02ef-\u036f\u0375\u0378-\u0379\u0384-\u0385\u03f6"
    "\u0483-\u0487\u055a-\u055f\u0591-\u05bd\u05bf\u05c1-\u05c2\u05c4-\u05c5\u05c7\u0615-\u061a\u064b-\u065e\u0670"
    "\u06d6-\u06e4\u06e7-\u06ed\u06fd-\u06fe\u070f\u0711\u0730-\u074c\u07a6-\u07b0\u07eb-\u07f3\u0900-\u0903\u093c"
    "\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc\u09be-\u09c4\u09c7-\u09c8\u09cb-\u09cd\u09d7"
    "\u09e2-\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc\u0abe-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8"
    "\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1"
    "\u0eb4-\u0ebc\u0ec8-\u0ecd\u1885-\u1886\u2071\u207f\u2090-\u209c\u2183-\u2184"
)
_LETTER = r"(?:[^\W\d_" + _NOT_LETTER_OR_DIGIT + "]|[" + _EXTRA_LETTERS + "])"
_ALNUM = r"(?:[^\W_" + _NOT_LETTER_OR_DIGIT + "]|[" + _EXTRA_LETTERS + "])"
_APOS = "['\u0092\u2019]"
_APOS_ETC = "['\u0092\u2019`\u0091\u2018\u201b]"
_HYPHEN = "[-_/\u058a\u2010\u2011]"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"

# Fractions written as one character become digits (normalizeFractions); CoreNLP 3.4.1 knows only these five, "⅕" and
# the other vulgar fractions stay as they are.
_FRACTION_CHARACTERS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u00a3": "#", "\u20ac": "$", "\u00a2": "cents", "\u00a4": "$", "\u20a0": "$", "\u0080": "$"}


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


# Curly, angle and Windows-1252 quotes: a run of them is one token, each character written as the ASCII quote of its
# side ("««" -> "````", which is not in PUNCTUATIONS and so stays in the caption, as in the toolkit).
_UNICODE_QUOTES = {
    "\u201c": "``", "\u00ab": "``", "\u0093": "``", "\u201d": "''", "\u00bb": "''", "\u0094": "''",
    "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0091": "`", "\u2019": "'", "\u203a": "'", "\u0092": "'",
}  # fmt: skip


def _unicode_quotes(text, before, after):
    return ["".join(_UNICODE_QUOTES[character] for character in text)]


def _single_quote(text, before, after):
    return ["`" if (before == "" or before in " \t\u00a0([{\"") and after[:1] not in ("", " ") else "'"]


def _dashes(text, before, after):
    return ["--"]


def _ellipsis(text, before, after):
    return ["..."]


def _bracket(text, before, after):
    return [_BRACKETS[text]]


def _smiley(text, before, after):
    return [text.replace("(", "-LRB-").replace(")", "-RRB-")]


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
    ("smiley", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", r"(?![A-Za-z0-9])", _smiley),
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
    ("ellipsis", r"\.\.\.|[\u2026\u0085]", None, _ellipsis),
    ("dashes", r"--+|[\u2013\u2014\u2015\u0096\u0097]", None, _dashes),
    ("soft_hyphen", "\u00ad", None, lambda t, b, a: ["-"]),
    ("latex_quotes", r"``|''", None, _word),
    ("double_quote", '"', None, _double_quote),
    ("single_quote", "['`]", None, _single_quote),
    ("unicode_quotes", "[" + "".join(_UNICODE_QUOTES) + "]+", None, _unicode_quotes),
    ("bracket", r"[()\[\]{}]", None, _bracket),
    ("exclamations", r"[?!]+", None, _word),
    ("repeated_symbols", r"\*+|#+|_+|<<|>>", None, _word),
    ("currency", "[A-Z]*\\$|[\u00a3\u20ac\u00a2\u00a4\u20a0\u0080]", None, _currency),
    ("symbol", r"[^\s" + _UNTOKENIZABLE + "]", None, _word),
]
_COMPILED = [
    (re.compile(pattern), re.compile(trailing) if trailing else None, action) for _, pattern, trailing, action in _RULES
]
# Java ends a line at any of these, so a caption holding one takes two lines of the output and the toolkit, which pairs
# output lines with captions in order, gives every later caption its predecessor's tokens. We do the same.
_LINE_BREAK = re.compile("\r\n|[\n\r\u000b\u000c\u2028\u2029]")
_SPACES = re.compile(r"[^\S\n\r\u000b\u000c\u2028\u2029]+")
_UNTOKENIZABLE_CHARACTER = re.compile("[" + _UNTOKENIZABLE + "]")


def _tokenize_lines(text: str) -> list:
    """Token lists of the lines of `text`. Lines are tokenised as one stream, as the toolkit hands all captions to
    Java in one file: the end of a caption can depend on how the next one starts."""
    lines = [[]]
    position = 0
    while position < len(text):
        line_break = _LINE_BREAK.match(text, position)
        if line_break:
            lines.append([])
            position = line_break.end()
            continue
        spaces = _SPACES.match(text, position)
        if spaces:
            position = spaces.end()
            continue
        if _UNTOKENIZABLE_CHARACTER.match(text, position):  # Java deletes it
            position += 1
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
        lines[-1].extend(action(text[position:end], " " if _LINE_BREAK.match(before) else before, text[end:]))
        position = end
    return lines


def ptb_tokenize_captions(captions: list) -> list:
    """The captions as the toolkit's PTBTokenizer.tokenize returns them, in the same order: lower-cased tokens joined
    by single spaces, punctuation tokens removed. Pass the captions in the order the toolkit would write them (all
    references image by image, or all predictions), since a caption's last token can depend on the next caption."""
    text = "\n".join(caption.replace("\n", " ") for caption in captions)
    return [
        " ".join(token.lower() for token in tokens if token.lower() not in PUNCTUATIONS)
        for tokens in _tokenize_lines(text)[: len(captions)]
    ]


def ptb_tokenize(caption: str) -> str:
    """One caption tokenised on its own (as the toolkit would if it were the last or only caption)."""
    return ptb_tokenize_captions([caption])[0]
