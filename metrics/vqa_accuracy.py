"""VQA accuracy, as the official VQA evaluation code and LAVIS compute it.

Self-contained on purpose: `evaluate.load("path/to/vqa_accuracy.py")` copies this file alone into its module cache.
"""

import re

import datasets
import evaluate


_DESCRIPTION = """\
VQA accuracy (Antol et al. 2015; Goyal et al. 2017). An answer counts as fully correct when at least 3 of the human
annotators gave it: for each of the N human answers, acc = min(1, matches among the other N-1 / 3), and a question
scores the mean over the N leave-one-out subsets. Answers are normalised first (punctuation, number words to digits,
articles, contractions). Three configurations:

- "official" (default): the current GT-Vision-Lab/VQA `vqaEval.py`. When the human answers all agree, prediction and
  answers are compared after stripping whitespace only; otherwise both are normalised.
- "lavis": the earlier revision of `vqaEval.py` that LAVIS vendors (`lavis/common/vqa_tools/vqa_eval.py`) and BLIP-2
  reported its VQAv2 / OK-VQA numbers with. The prediction is always normalised; the human answers only lose
  punctuation, and only when they disagree.
- "exact": LAVIS's GQA task. One reference answer per question; prediction and reference are both normalised as the
  "lavis" prediction is, and must then be equal (a reference such as "t-shirt" becomes "t shirt", as the prediction).
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
@inproceedings{li2023blip2,
  title={{BLIP-2}: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language Models},
  author={Li, Junnan and Li, Dongxu and Savarese, Silvio and Hoi, Steven},
  booktitle={ICML},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated answer per question.
    references (`list` of `list` of `str`): the human answers of each question (10 for VQAv2 and OK-VQA; exactly one
        for the "exact" configuration).
Returns:
    accuracy (`float`): mean accuracy in percent (0-100), not rounded.
    per_question (`list` of `float`): each question's accuracy in [0, 1].
Examples:
    >>> vqa_accuracy = VQAAccuracy(config_name="official")
    >>> vqa_accuracy.compute(predictions=["two"], references=[["2"] * 2 + ["3"] * 8])["per_question"]
    [0.6]
"""

CONFIG_NAMES = ("official", "lavis", "exact")

# The tables below are the ones in vqaEval.py, spelled as there (keys such as "Im" can never match a lower-cased word).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Both patterns are kept as written in vqaEval.py: "(?!<=\d)" is a typo for a look-behind and acts as a look-ahead,
# so a period is removed whenever no digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# vqaEval.py passes re.UNICODE (= 32) where re.sub expects `count`, so at most 32 periods are removed.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """`VQAEval.processPunctuation`: a mark next to a space (or any mark in text holding "digit,digit") is deleted,
    other marks become a space; then periods not followed by a digit go."""
    out = text
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if delete_marks or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, _PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """`VQAEval.processDigitArticle`: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out_accuracy(prediction: str, answers: list) -> float:
    """Mean over the answers of min(1, matches among the other answers / 3), summed in the reference's order."""
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    per_annotator = [min(1, float(total - match) / 3) for match in matches]
    return float(sum(per_annotator)) / len(per_annotator)


def question_accuracy(prediction: str, answers: list, config_name: str = "official") -> float:
    """One question's accuracy in [0, 1] under `config_name` ("official", "lavis" or "exact")."""
    if config_name == "exact":
        if len(answers) != 1:
            raise ValueError(f"The 'exact' configuration takes one reference answer per question; got {len(answers)}.")
        # lavis/tasks/vqa.py GQATask._report_metrics normalises the reference too (LAVIS main); the revision BLIP-2
        # shipped with compared against the raw reference, so a hyphenated answer such as "t-shirt" could never match.
        return 1.0 if normalize_answer(prediction) == normalize_answer(answers[0]) else 0.0
    if not answers:
        raise ValueError("A question has no reference answers; expected the human answers (10 for VQAv2).")
    prediction = _strip_whitespace(prediction)
    if config_name == "official":
        answers = [_strip_whitespace(answer) for answer in answers]
        if len(set(answers)) > 1:
            answers = [normalize_answer(answer) for answer in answers]
            prediction = normalize_answer(prediction)
    elif config_name == "lavis":
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(answer) for answer in answers]
    else:
        raise ValueError(f"Unknown VQA accuracy configuration {config_name!r}; expected one of {CONFIG_NAMES}.")
    return _leave_one_out_accuracy(prediction, answers)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIG_NAMES + ("default",):
            raise ValueError(f"Unknown VQA accuracy configuration {self.config_name!r}; expected one of {CONFIG_NAMES}.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=[
                "https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py",
                "https://github.com/salesforce/LAVIS/blob/main/lavis/common/vqa_tools/vqa_eval.py",
                "https://github.com/salesforce/LAVIS/blob/main/lavis/tasks/vqa.py",
            ],
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("VQAAccuracy got no predictions; expected one answer per question.")
        config_name = "official" if self.config_name == "default" else self.config_name
        per_question = [question_accuracy(p, list(r), config_name) for p, r in zip(predictions, references)]
        if config_name == "exact":
            accuracy = sum(per_question) / len(per_question) * 100  # LAVIS GQATask's order of operations
        else:
            accuracy = 100 * float(sum(per_question)) / len(per_question)  # VQAEval.setAccuracy, before rounding
        return {"accuracy": accuracy, "per_question": per_question}
