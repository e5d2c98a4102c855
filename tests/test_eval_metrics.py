"""The benchmark metrics against worked examples from their definitions, and the scoring that sits on top
(MMBench circular evaluation, POPE's summary, per-category means) on predictions written by hand.
No model here."""
import math

import pytest

from dsvl_jax.eval import formats, metrics, scoring
from dsvl_jax.eval.vqa_normalize import CONTRACTIONS, normalize


# ---- VQAv2 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, want", [
    ("Two dogs.", "2 dogs"),  # number word → digit, final period removed
    ("the cat, the dog", "cat dog"),  # ", " → comma deleted; articles dropped
    ("red-white", "red white"),  # a hyphen with no space beside it becomes a space
    ("1,000", "1000"),  # a comma between digits: every mark deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("dont", "don't"),  # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("None", "0"),
    ("Yes!\n", "yes"),
])
def test_vqa_normalisation(raw, want):
    assert normalize(raw) == want


def test_contraction_table_is_the_official_shape():
    # one missing apostrophe at a time; never the fully stripped two-apostrophe form; real words stay words
    assert CONTRACTIONS["hadnt've"] == CONTRACTIONS["hadn'tve"] == "hadn't've"
    assert "hadntve" not in CONTRACTIONS
    assert CONTRACTIONS["ow's'at"] == CONTRACTIONS["'ows'at"] == CONTRACTIONS["'ow'sat"] == "'ow's'at"
    for word in ("well", "were", "its", "shed", "ill", "lets", "wed", "id"):
        assert word not in CONTRACTIONS


def test_vqa_accuracy_leave_one_out():
    # min(1, matches/3) averaged over the 10 subsets of 9: 1 match → 0.3, 2 → 0.6, 3 → 0.9, 4+ → 1
    for matches, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["2"] * matches + ["3"] * (10 - matches)
        assert metrics.vqa_accuracy("two", answers) == pytest.approx(want)
    assert metrics.vqa_accuracy("A dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("x", [])


# ---- ANLS -----------------------------------------------------------------------------------------
def test_anls():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 edit in 5 characters
    assert metrics.anls("Hello   World ", ["hello world"]) == 1.0  # case and whitespace runs ignored
    assert metrics.anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 is not below the threshold
    assert metrics.anls("abcde", ["abxye"]) == pytest.approx(0.6)  # NL = 0.4
    assert metrics.anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # the best answer counts
    assert metrics.anls("", [""]) == 1.0


# ---- ChartQA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, target, want", [
    ("10.4", "10", 1.0), ("10.6", "10", 0.0), ("9.5", "10", 1.0), ("-5.2", "-5", 1.0),
    ("40%", "0.4", 1.0),  # a percentage is its fraction
    ("0.0", "0", 0.0),  # a zero target has no relative error: the strings differ
    ("0", "0", 1.0), ("Yes", "yes", 1.0), (" Blue ", "blue", 1.0), ("inf", "inf", 1.0), ("nan", "1", 0.0),
])
def test_relaxed_accuracy(pred, target, want):
    assert metrics.relaxed_accuracy(pred, target) == want


# ---- MMBench matcher ------------------------------------------------------------------------------
OPTIONS = {"A": "cat", "B": "dog", "C": "a red bird"}


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(C)", "C"), ("Answer: B.", "B"), ("The answer is C. a red bird", "C"),
    ("dog", "B"), ("I think it is a DOG", "B"),  # no letter: the one option whose text occurs
    ("A or B", None),  # two letters and no option text
    ("cat and dog", None),  # two option texts
    ("fish", None), ("", None),
    ("A cat sits there", "A"),  # MMBench's matcher takes a lone "A" as the letter
    ("D", None),  # not an option here
])
def test_mmbench_choice(text, want):
    assert metrics.mmbench_choice(text, OPTIONS) == want


# ---- POPE -----------------------------------------------------------------------------------------
def test_pope_answer_and_scores():
    assert metrics.pope_answer("Yes, there is a dog.") == "yes"
    assert metrics.pope_answer("No.") == "no"
    assert metrics.pope_answer("There is not a dog in the image") == "no"
    assert metrics.pope_answer("I see no dog. Yes") == "no"  # only the first sentence counts
    assert metrics.pope_answer("Nope") == "yes"  # not one of the no-words
    s = metrics.binary_scores(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "no", "yes"])
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(0.6) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(0.6)


# ---- scoring on hand-written predictions ----------------------------------------------------------
def mmbench_items():
    items = []
    for index, (opts, right, cat) in enumerate([({"A": "red", "B": "green", "C": "blue"}, "B", "colour"),
                                                ({"A": "one", "B": "two"}, "A", "count"),
                                                ({"A": "up", "B": "down"}, "B", "count")]):
        for k, (rot, letter) in enumerate(formats.rotations(opts, right)):
            items.append(formats.Item(f"{index}/r{k}", str(index), cat, "q", [], {"options": rot, "answer": letter,
                                                                                 "rotation": k}, f"row {index}"))
    return items


def test_rotations_move_the_right_answer():
    rots = formats.rotations({"A": "red", "B": "green", "C": "blue"}, "B")
    assert [r[0]["A"] for r in rots] == ["red", "green", "blue"]
    assert all(opts[letter] == "green" for opts, letter in rots)


def test_circular_evaluation_needs_every_rotation():
    items = mmbench_items()
    by_id = {i.id: i for i in items}
    # Question 0: the model always answers the text "green" → right in every rotation.
    # Question 1: always the letter "A" → right only in the rotation where "one" sits at A.
    # Question 2: right in both rotations, but its second prompt was skipped → left out.
    preds = {i.id: "green" for i in items if i.group == "0"}
    preds.update({i.id: "A" for i in items if i.group == "1"})
    preds["2/r0"] = by_id["2/r0"].reference["answer"]
    s = scoring.summarize("mmbench", items, preds)
    assert s["questions"] == 2
    assert s["per_category"] == {"colour": {"score": 1.0, "n": 1}, "count": {"score": 0.0, "n": 1}}
    assert s["overall"] == 0.5
    assert s["first_rotation_accuracy"] == 1.0  # all three first rotations were right
    assert {r["id"]: r["read"] for r in s["records"]}["1/r1"] == "A"
    table = scoring.table(s)
    assert "colour" in table and "100.0%" in table and "first rotation only" in table


def test_pope_and_suite_summaries():
    items = [formats.Item(str(i), str(i), cat, "q", [], {"label": lab}, f"line {i}")
             for i, (cat, lab) in enumerate([("random", "yes"), ("random", "no"), ("adversarial", "yes")])]
    s = scoring.summarize("pope", items, {"0": "Yes it is.", "1": "Yes.", "2": "No, not at all."})
    assert s["per_category"]["random"]["score"] == 0.5 and s["per_category"]["adversarial"]["score"] == 0.0
    assert s["pope"]["fp"] == 1 and s["pope"]["fn"] == 1 and s["pope"]["tp"] == 1
    # the suite's overall is the mean over families, not over questions
    suite = [formats.Item(str(i), str(i), fam, "q", [], {"answer": "7"}, "") for i, fam in
             enumerate(["chart", "chart", "chart", "map"])]
    s = scoring.summarize("suite", suite, {"0": "7.", "1": "7", "2": "8", "3": "7"})
    assert s["per_category"]["chart"]["score"] == pytest.approx(2 / 3)
    assert s["overall"] == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(scoring.summarize("vqa", [], {})["overall"])
