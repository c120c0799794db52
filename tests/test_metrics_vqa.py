"""VQAAccuracy against re-statements of the reference evaluation code, question by question.

The oracles below follow the originals line for line (only Python 2 idioms and the progress bar are dropped):
- `OfficialVQAEval`: GT-Vision-Lab/VQA master, PythonEvaluationTools/vqaEvaluation/vqaEval.py;
- `LavisVQAEval`: the earlier revision vendored as lavis/common/vqa_tools/vqa_eval.py;
- `lavis_gqa_accuracy`: lavis/tasks/vqa.py GQATask._report_metrics (LAVIS main: prediction and reference normalised).
Each human answer is a dict with its own answer_id, as in the VQA annotation files: `item != gtAnsDatum` then
leaves out exactly one answer even when two annotators typed the same string.
"""

import re

import pytest

from modeling_blip2.metrics import VQAAccuracy
from modeling_blip2.metrics.vqa_accuracy import normalize_answer, question_accuracy


CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't", \
                 "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", \
                 "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", \
                 "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", \
                 "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", \
                 "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", \
                 "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", \
                 "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", \
                 "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", \
                 "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", \
                 "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've", \
                 "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've", \
                 "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've", \
                 "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", \
                 "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", \
                 "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", \
                 "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", \
                 "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", \
                 "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", \
                 "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", \
                 "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", \
                 "youll": "you'll", "youre": "you're", "youve": "you've"}  # fmt: skip


class _VQAEvalBase:
    def __init__(self):
        self.contractions = dict(CONTRACTIONS)
        self.manualMap = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                          'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}  # fmt: skip
        self.articles = ['a', 'an', 'the']
        self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
        self.commaStrip = re.compile(r"(\d)(\,)(\d)")
        self.punct = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']  # fmt: skip

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) != None):  # noqa: E711
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
            else:
                pass
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = ' '.join(outText)
        return outText

    def evaluate(self, gts, res):
        """gts: {quesId: {"answers": [{"answer": ..., "answer_id": ...}]}}, res: {quesId: {"answer": ...}}."""
        self.evalQA = {}
        accQA = []
        for quesId in gts:
            avgGTAcc = self.question(gts[quesId], res[quesId])
            accQA.append(avgGTAcc)
            self.evalQA[quesId] = avgGTAcc
        return 100 * float(sum(accQA)) / len(accQA)  # setAccuracy without round(..., 2)


class OfficialVQAEval(_VQAEvalBase):
    def question(self, gt, res):
        for ansDic in gt['answers']:
            ansDic['answer'] = ansDic['answer'].replace('\n', ' ')
            ansDic['answer'] = ansDic['answer'].replace('\t', ' ')
            ansDic['answer'] = ansDic['answer'].strip()
        resAns = res['answer']
        resAns = resAns.replace('\n', ' ')
        resAns = resAns.replace('\t', ' ')
        resAns = resAns.strip()
        gtAcc = []
        gtAnswers = [ans['answer'] for ans in gt['answers']]

        if len(set(gtAnswers)) > 1:
            for ansDic in gt['answers']:
                ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)

        for gtAnsDatum in gt['answers']:
            otherGTAns = [item for item in gt['answers'] if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item['answer'] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        return float(sum(gtAcc)) / len(gtAcc)


class LavisVQAEval(_VQAEvalBase):
    def question(self, gt, res):
        resAns = res["answer"]
        resAns = resAns.replace("\n", " ")
        resAns = resAns.replace("\t", " ")
        resAns = resAns.strip()
        resAns = self.processPunctuation(resAns)
        resAns = self.processDigitArticle(resAns)
        gtAcc = []
        gtAnswers = [ans["answer"] for ans in gt["answers"]]
        if len(set(gtAnswers)) > 1:
            for ansDic in gt["answers"]:
                ansDic["answer"] = self.processPunctuation(ansDic["answer"])
        for gtAnsDatum in gt["answers"]:
            otherGTAns = [item for item in gt["answers"] if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        return float(sum(gtAcc)) / len(gtAcc)


def lavis_gqa_accuracy(results):
    acc = []
    vqa_tool = _VQAEvalBase()
    for res in results:
        gt_ans = res["gt_ans"]
        pred = res["pred_ans"]
        pred = vqa_tool.processPunctuation(pred)
        pred = vqa_tool.processDigitArticle(pred)
        gt_ans = vqa_tool.processPunctuation(gt_ans)
        gt_ans = vqa_tool.processDigitArticle(gt_ans)
        vqa_acc = 1 if pred == gt_ans else 0
        acc.append(vqa_acc)
    return sum(acc) / len(acc) * 100, acc


def _as_annotations(predictions, references):
    gts = {
        question_id: {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
        for question_id, answers in enumerate(references)
    }
    res = {question_id: {"answer": p} for question_id, p in enumerate(predictions)}
    return gts, res


# (prediction, 10 human answers): each targets one normalisation rule or one difference between the revisions.
TRICKY_CASES = [
    ("dont", ["don't"] * 4 + ["no"] * 6),
    ("don't", ["dont"] * 3 + ["no"] * 7),
    ("Dont", ["don't"] * 10),
    ("two", ["2"] * 10),
    ("two", ["2"] * 5 + ["two"] * 5),
    ("2", ["two"] * 4 + ["three"] * 6),
    ("none", ["0"] * 3 + ["zero"] * 3 + ["none"] * 4),
    ("ten", ["10"] * 9 + ["many"]),
    ("a dog", ["dog"] * 6 + ["the dog"] * 4),
    ("the dog", ["dog"] * 10),
    ("An apple", ["apple"] * 2 + ["an apple"] * 8),
    ("1,000", ["1000"] * 5 + ["1,000"] * 5),
    ("1,000", ["1000"] * 10),
    ("1000", ["1,000"] * 3 + ["1000"] * 7),
    ("yes.", ["yes"] * 10),
    ("yes.", ["yes"] * 9 + ["no"]),
    ("Yes", ["yes"] * 7 + ["no"] * 3),
    ("it's", ["it's"] * 4 + ["its"] * 6),
    ("its", ["it's"] * 5 + ["it is"] * 5),
    ("3.5", ["3.5"] * 4 + ["3"] * 6),
    ("3.5.", ["3.5"] * 4 + ["35"] * 6),
    ("  red   and  white ", ["red and white"] * 5 + ["red"] * 5),
    ("red\tand\nwhite", ["red and white"] * 5 + ["white"] * 5),
    ("black/white", ["black white"] * 4 + ["black and white"] * 6),
    ("black / white", ["black white"] * 3 + ["blackwhite"] * 7),
    ("black/white", ["black/white"] * 10),
    ("@home", ["home"] * 4 + ["@ home"] * 6),
    ("t-shirt", ["t shirt"] * 5 + ["tshirt"] * 5),
    ("t-shirt", ["t-shirt"] * 10),
    ("left (side)", ["left side"] * 6 + ["left"] * 4),
    ("what's that?", ["what's that"] * 3 + ["whats that"] * 7),
    ("whats that", ["what's that"] * 8 + ["no"] * 2),
    ("10:30", ["10:30"] * 5 + ["1030"] * 5),
    ("2,5 and 3", ["25 and 3"] * 5 + ["2 5 and 3"] * 5),
    ("Hello, World!", ["hello world"] * 3 + ["hello, world"] * 7),
    ("..." + "a." * 20 + ".", ["a"] * 10),
    ("a" + "." * 40, ["a"] * 5 + ["b"] * 5),
    ("one dog", ["1 dog"] * 2 + ["one dog"] * 8),
    ("", ["yes"] * 10),
    ("", [""] * 4 + ["nothing"] * 6),
    ("yes", ["yes", "yes", "yes", "no", "no", "no", "maybe", "yes ", " yes", "yes\n"]),
    ("Yes", ["Yes"] * 10),
    ("ten dollars", ["$10"] * 3 + ["10 dollars"] * 7),
    ("mcdonald's", ["mcdonald's"] * 5 + ["mcdonalds"] * 5),
    ("y'all", ["yall"] * 5 + ["y'all"] * 5),
    ("cat", ["cat"] + ["dog"] * 9),
    ("Cats.", ["cats"] * 2 + ["cat"] * 8),
]


@pytest.mark.parametrize(
    ("config_name", "oracle"), [("official", OfficialVQAEval), ("lavis", LavisVQAEval)], ids=["official", "lavis"]
)
def test_vqa_accuracy_equals_reference_code_on_every_tricky_question(config_name, oracle):
    predictions = [p for p, _ in TRICKY_CASES]
    references = [list(r) for _, r in TRICKY_CASES]
    reference_eval = oracle()
    expected_accuracy = reference_eval.evaluate(*_as_annotations(predictions, references))
    expected_per_question = [reference_eval.evalQA[i] for i in range(len(predictions))]

    result = VQAAccuracy(config_name=config_name).compute(predictions=predictions, references=references)

    assert result["per_question"] == expected_per_question
    assert result["accuracy"] == expected_accuracy
    # The cases must exercise the rules: some partial credit, some full and some zero scores.
    assert {0.0, 1.0} <= set(expected_per_question) and len(set(expected_per_question)) >= 4


def test_official_and_lavis_revisions_disagree_where_their_code_differs():
    # All annotators agree on "2": the official code then compares the stripped strings, LAVIS normalises "two".
    references = [["2"] * 10]
    assert VQAAccuracy(config_name="official").compute(predictions=["two"], references=references)["accuracy"] == 0.0
    assert VQAAccuracy(config_name="lavis").compute(predictions=["two"], references=references)["accuracy"] == 100.0
    # Annotators disagree and wrote "two": only the official code maps their answers to digits.
    references = [["two"] * 4 + ["three"] * 6]
    assert VQAAccuracy(config_name="official").compute(predictions=["two"], references=references)["accuracy"] == 100.0
    assert VQAAccuracy(config_name="lavis").compute(predictions=["two"], references=references)["accuracy"] == 0.0


def test_leave_one_out_credit_by_hand():
    # 2 of 10 annotators said "cat": each of the 8 others sees 2 matches (2/3), each of the 2 sees 1 (1/3).
    result = VQAAccuracy().compute(predictions=["cat", "dog"], references=[["cat"] * 2 + ["dog"] * 8] * 2)
    assert result["per_question"][0] == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert result["per_question"][1] == 1.0
    assert result["accuracy"] == pytest.approx(100 * (result["per_question"][0] + 1.0) / 2)


GQA_CASES = [
    ("Yes.", "yes"),
    ("the table", "table"),
    ("two", "2"),
    ("two", "two"),
    ("left", "left"),
    ("Left side", "left side"),
    ("t-shirt", "t-shirt"),
    ("t-shirt", "t shirt"),
    ("white/black", "white black"),
    ("  no ", "no"),
    ("it's", "it's"),
    ("shirt", "t-shirt"),
    ("three", "2"),
]


def test_exact_configuration_equals_lavis_gqa_task():
    predictions = [p for p, _ in GQA_CASES]
    expected_accuracy, expected_per_question = lavis_gqa_accuracy(
        [{"pred_ans": p, "gt_ans": g} for p, g in GQA_CASES]
    )
    result = VQAAccuracy(config_name="exact").compute(predictions=predictions, references=[[g] for _, g in GQA_CASES])
    assert result["per_question"] == expected_per_question
    assert result["accuracy"] == expected_accuracy
    assert 0 < expected_accuracy < 100


def test_exact_configuration_normalises_the_reference_as_the_prediction():
    # Each pair matches only because the reference is normalised too; against the raw reference all would score 0.
    predictions = ["t-shirt", "T-Shirt.", "2", "the tennis racket", "yes"]
    references = [["t-shirt"], ["t-shirt"], ["two"], ["a tennis racket"], ["yes"]]
    result = VQAAccuracy(config_name="exact").compute(predictions=predictions, references=references)
    assert result["per_question"] == [1, 1, 1, 1, 1]
    raw_reference_scores = [float(normalize_answer(p) == r[0]) for p, r in zip(predictions, references)]
    assert raw_reference_scores == [0, 0, 0, 0, 1]
    result = VQAAccuracy(config_name="exact").compute(predictions=["t shirt", "shirt"], references=[["t-shirt"]] * 2)
    assert result["per_question"] == [1, 0] and result["accuracy"] == 50.0


def test_bad_configuration_and_inputs_are_named_in_the_error():
    with pytest.raises(ValueError, match="'vqa2'"):
        VQAAccuracy(config_name="vqa2")
    with pytest.raises(ValueError, match="one reference answer per question; got 2"):
        VQAAccuracy(config_name="exact").compute(predictions=["a"], references=[["a", "b"]])
    with pytest.raises(ValueError, match="one reference answer per question; got 0"):
        VQAAccuracy(config_name="exact").compute(predictions=["a"], references=[[]])
    with pytest.raises(ValueError, match="no reference answers"):
        VQAAccuracy().compute(predictions=["a"], references=[[]])


def test_an_unknown_configuration_such_as_gqa_is_refused_by_name():
    # "gqa" is the natural wrong guess for the "exact" configuration (LAVIS's GQA task).
    with pytest.raises(ValueError, match=r"Unknown VQA accuracy configuration 'gqa'; expected one of \('official', "):
        VQAAccuracy(config_name="gqa")
    with pytest.raises(ValueError, match=r"Unknown VQA accuracy configuration 'gqa'"):
        question_accuracy("two", ["2"] * 10, config_name="gqa")


def test_configuration_names_built_at_runtime_select_their_configuration():
    # Names joined at runtime are equal to the literals but not the same objects: the configuration is chosen by
    # equality, so a name read from a command line or a config file works as the literal does.
    official, lavis, exact, default = ("".join(parts) for parts in (["offi", "cial"], ["la", "vis"], ["ex", "act"],
                                                                     ["def", "ault"]))
    assert official == "official" and id(official) != id("official")  # equal, yet another object
    # "official" normalises the disagreeing answers ("two" -> "2": 10 matches), "lavis" the prediction only (2 match)
    disagreeing = ["2"] * 2 + ["two"] * 8
    assert question_accuracy("two", disagreeing, official) == 1.0
    assert question_accuracy("two", disagreeing, lavis) == pytest.approx(0.6)
    assert question_accuracy("t shirt", ["t-shirt"], exact) == 1.0
    assert VQAAccuracy(config_name=official).compute(predictions=["two"], references=[disagreeing])["accuracy"] == 100.0
    assert VQAAccuracy(config_name=default).compute(predictions=["two"], references=[disagreeing])["accuracy"] == 100.0
    # One right of three: LAVIS's GQA order of operations, sum / n * 100 = 33.33333333333333, not 100 * sum / n
    # (33.333333333333336).
    one_of_three = VQAAccuracy(config_name=exact).compute(predictions=["t shirt", "no", "no"],
                                                          references=[["t-shirt"], ["yes"], ["yes"]])
    assert one_of_three["accuracy"] == 1 / 3 * 100 != 100 * 1 / 3
