"""Official extraction rules per benchmark, on terse, verbose, multi-letter, parenthesised,
lower-case, "The answer is (B)", empty and non-English outputs.

Every expected value was worked out by hand from the official code (cited in each module);
the reasoning is in the comment next to each case.
"""

from __future__ import annotations

import pytest

from uhrbat.evaluation import benchmarks, wordnet
from uhrbat.evaluation.benchmarks import hrbench, lrs_vqa, mme_realworld, rshr, xlrs
from uhrbat.evaluation.records import Prediction, Sample
from uhrbat.evaluation.scoring import robust_letters


def _s(answer="B", options=None, lines=None, category=None, sid="1", **kw) -> Sample:
    options = options if options is not None else {"A": "1", "B": "2", "C": "3", "D": "4"}
    lines = lines if lines is not None else [f"({k}) {v}" for k, v in options.items()]
    return Sample(
        id=sid, row=0, question="q", options=options, option_lines=lines, answer=answer, category=category, **kw
    )


# ----------------------------------------------------------------------------------------------
# XLRS (lmms-eval tasks/xlrs/mcq_utils.py)
# ----------------------------------------------------------------------------------------------

XLRS_CASES = [
    # terse: upper-case B present; no "(x)"; the all-optional pattern finds just "B".
    ("B", "B", "B", True),
    # verbose: a-e letters of "B. There are 2 ships in the image." are B, e,e (There), a,e (are),
    # e (the), a,e (image) -> {A, B, E}: wrong.
    ("B. There are 2 ships in the image.", "B", "ABE", False),
    # multi-letter answer for a multi-answer item: {A, C} == set("AC").
    ("A C", "AC", "AC", True),
    ("A, C", "AC", "AC", True),
    # parenthesised: "(B)" found by the parenthesis pattern.
    ("(B)", "B", "B", True),
    # lower-case only: no upper-case A-E at all -> "" (unparsed).
    ("b", "B", "", False),
    # "The answer is" is stripped -> " (B)" -> B.
    ("The answer is (B)", "B", "B", True),
    # empty output -> "" -> set() != {"B"}.
    ("", "B", "", False),
    # non-English: "答案是 B。" has upper-case B; the only a-e character -> B.
    ("答案是 B。", "B", "B", True),
    # "The correct option is" is never stripped (missing comma in the prefix list):
    # e (The), c,e,c (correct), B -> {B, C, E}.
    ("The correct option is B", "B", "BCE", False),
    # A multi-letter output for a single-answer item is wrong (set match).
    ("B D", "B", "BD", False),
]


@pytest.mark.parametrize("output,answer,parsed,ok", XLRS_CASES)
def test_xlrs_extraction(output, answer, parsed, ok):
    s = _s(answer=answer, category="Counting/Overall counting")
    got = xlrs.extract(output, s)
    assert got == parsed
    assert xlrs.correct(got, s) is ok


def test_xlrs_micro_macro_by_hand():
    # 3 questions in "Counting/Overall counting" (2 right), 1 in "Object properties/Object color" (right).
    cats = ["Counting/Overall counting"] * 3 + ["Object properties/Object color"]
    samples = [_s(answer="B", category=c, sid=str(i)) for i, c in enumerate(cats)]
    preds = {"0": "B", "1": "B", "2": "C", "3": "(B)"}
    rep = xlrs.score(samples, preds)
    # weighted average (UHR-BAT) = micro = 3/4 = 75 %: the sub-task accuracies weighted by their questions.
    assert rep.headline["weighted_avg"] == pytest.approx(75.0) == rep.metrics["micro"]
    assert rep.headline["weighted_avg"] == pytest.approx((3 * 200 / 3 + 1 * 100) / 4)
    # 13-sub-task mean (GeoLLaVA-8K, DualComp) = macro (lmms-eval): the 11 absent tasks count 0.
    assert rep.headline["subtask_mean"] == pytest.approx((200 / 3 + 100) / 13) == rep.metrics["macro"]
    assert list(rep.headline) == ["weighted_avg", "subtask_mean"]
    notes = rep.headline_notes()
    assert "UHR-BAT" in notes["weighted_avg"] and "GeoLLaVA-8K" in notes["subtask_mean"]
    assert "DualComp" in notes["subtask_mean"] and "13" in notes["subtask_mean"]
    # VLMEvalKit-style mean over the present tasks: (66.67 + 100) / 2.
    assert rep.metrics["macro_present"] == pytest.approx((200 / 3 + 100) / 2)
    assert rep.per_sample == {"0": True, "1": True, "2": False, "3": True}
    assert rep.n == 4 and rep.n_errors == 0


def test_xlrs_ground_truth_characters_compared_raw():
    # set("A,C") contains "," so the official comparison can never match it: reported, not fixed.
    s = _s(answer="A,C", category="Land use classification/Overall Land use classification")
    assert not xlrs.correct(xlrs.extract("A C", s), s)
    rep = xlrs.score([s], {"1": "A C"})
    assert "note_answers" in rep.meta


# ----------------------------------------------------------------------------------------------
# MME-RealWorld (evaluation/eval_your_results.py)
# ----------------------------------------------------------------------------------------------

MME_LINES = ["(A) red", "(B) blue", "(C) 3", "(D) 4", "(E) The image does not feature the object"]
MME_CASES = [
    ("B", "B", "B", True),  # terse: first upper-case A-E.
    # verbose: 7 words; first upper-case A-E is the final "B" ("T" of "The" is not A-E).
    ("The blue one, which is option B.", "B", "B", True),
    # verbose trap: the first upper-case A-E is the "C" of "Considering".
    ("Considering the colours, it is B", "B", "C", False),
    ("A C", "B", "A", False),  # multi-letter: only the first letter counts.
    ("(B)", "B", "B", True),  # parenthesised.
    # lower-case: no upper-case A-E -> first choice containing "b" is "(B) blue" -> choice[1] = "B".
    ("b", "B", "B", True),
    ("blue", "B", "B", True),  # the option text itself, same route.
    ("The answer is (B)", "B", "B", True),  # prefix stripped -> " (B)" -> B.
    # empty: "" is a substring of the first choice -> "A" (wrong for B, right for A).
    ("", "B", "A", False),
    ("", "A", "A", True),
    ("答案是B", "B", "B", True),  # non-English with a letter.
    ("蓝色", "B", "", False),  # non-English, no letter, not inside any choice -> "".
    # >10 words and no upper-case A-E -> "" before any choice matching.
    ("it is definitely the one that looks like the colour of the sky", "B", "", False),
]


@pytest.mark.parametrize("output,answer,parsed,ok", MME_CASES)
def test_mme_extraction(output, answer, parsed, ok):
    s = _s(
        answer=answer,
        options={k: v for k, v in zip("ABCDE", ["red", "blue", "3", "4", "x"])},
        lines=MME_LINES,
        category="color",
        extra={"task": "Perception"},
    )
    got = mme_realworld.extract(output, s)
    assert got == parsed
    assert mme_realworld.correct(got, s) is ok


def test_mme_avg_and_avg_c_by_hand():
    # color: 1/1, count: 1/2, position: 0/1  -> avg = 2/4 = 50; avg_c = (100 + 50 + 0) / 3 = 50.
    # "Color/Attribute" is folded to "color/attribute" (lower-case + attribute rule).
    specs = [("color", "A", "A"), ("count", "C", "C"), ("count", "C", "D"), ("position", "E", "B")]
    samples = [
        _s(answer=a, lines=MME_LINES, category=c, sid=str(i), extra={"task": "Perception"})
        for i, (c, a, _) in enumerate(specs)
    ]
    rep = mme_realworld.score(samples, {str(i): p for i, (_, _, p) in enumerate(specs)})
    assert rep.headline == {"avg": pytest.approx(50.0), "avg_c": pytest.approx(50.0)}
    assert set(rep.per_category) == {"Perception/color", "Perception/count", "Perception/position"}
    s = _s(category="Vehicle/Attribute/Color", extra={"task": "Perception"})
    assert mme_realworld.category_of(s) == "Perception/vehicle/attribute"


# ----------------------------------------------------------------------------------------------
# RSHR (reference evaluator letter-set rule)
# ----------------------------------------------------------------------------------------------

RSHR_CASES = [
    ("B", "B", "B", True),
    # verbose: upper-cased "B. THERE ARE 2 SHIPS." holds B and the A of "ARE" -> {A, B}.
    ("B. There are 2 ships.", "B", "AB", False),
    ("B, D", "BD", "BD", True),  # multi-letter.
    ("(B)", "B", "B", True),
    ("b", "B", "B", True),  # upper-cased before matching.
    # "THE ANSWER IS (B)": the A of "ANSWER" counts -> {A, B}.
    ("The answer is (B)", "B", "AB", False),
    ("", "B", "", False),
    ("答案是B", "B", "B", True),
    ("<|im_end|>B", "B", "B", True),  # special tokens removed first.
    ("E", "B", "", False),  # only A-D are letters in the reference evaluator.
]


@pytest.mark.parametrize("output,answer,parsed,ok", RSHR_CASES)
def test_rshr_extraction(output, answer, parsed, ok):
    s = _s(answer=answer, category="COL")
    got = rshr.extract(output, s)
    assert got == parsed
    assert rshr.correct(got, s) is ok


def test_rshr_groups_and_open_ended_rows():
    samples = [
        _s(answer="A", category="COL", sid="p1"),
        _s(answer="B", category="OCN", sid="p2"),
        _s(answer="C", category="AD", sid="r1"),
        _s(answer="yes", category="OSJ", sid="open"),
    ]
    rep = rshr.score(samples, {"p1": "A", "p2": "C", "r1": "C", "open": "yes"})
    # the open-ended row ("yes" has no A-D) is an error, scored wrong.
    assert rep.n == 4 and rep.n_errors == 1 and rep.per_sample["open"] is False
    # micro = 2/4; per category COL 100, OCN 0, AD 100, OSJ 0 -> macro 50.
    assert rep.headline == {"micro": pytest.approx(50.0), "macro": pytest.approx(50.0)}
    assert rep.metrics["perception_micro"] == pytest.approx(50.0)
    assert rep.metrics["reasoning_micro"] == pytest.approx(50.0)  # AD right, OSJ error
    assert "no official RSHR scorer" in rep.meta["scorer"]


# ----------------------------------------------------------------------------------------------
# HR-Bench (lmms-eval tasks/hrbench rule path)
# ----------------------------------------------------------------------------------------------

HR_OPTS = {"A": "red", "B": "green", "C": "blue", "D": "white"}
HR_CASES = [
    ("B", "B", True),  # one option letter token.
    # verbose: tokens The/answer/is/B/because/... hold exactly one option letter.
    ("The answer is B because the roof is green.", "B", True),
    # two letter tokens (A, B) -> option route fails; option texts inside: only "red" -> A.
    ("A red car is next to B", "A", False),
    # multi-letter: two tokens, no option text inside "a c" -> the LLM judge would be asked.
    ("A C", None, False),
    ("(B)", "B", True),  # brackets become spaces.
    ("b", None, False),  # "b" is not the token "B"; no option text -> judge.
    ("green", "B", True),  # option text route.
    ("The answer is (B)", "B", True),
    ("", None, False),  # empty -> judge.
    ("答案是B", None, False),  # one token "答案是B": no letter token, no option text -> judge.
    ("答案是 B", "B", True),
    ("Cannot determine the answer", "Z", False),  # refusal -> Z.
]


@pytest.mark.parametrize("output,parsed,ok", HR_CASES)
def test_hrbench_extraction(output, parsed, ok):
    s = _s(answer="B", options=dict(HR_OPTS), category="single", extra={"cycle_category": "c1"})
    got = hrbench.extract(output, s)
    assert got == parsed
    assert hrbench.correct(got, s) is ok
    assert s.options == HR_OPTS  # the official code lower-cases its dict in place; ours must not leak


def test_hrbench_cycle_average_by_hand():
    # single: cycle_1 1/1, cycle_2 0/1 -> fsp = (100 + 0) / 2 = 50
    # cross:  cycle_1 1/2, cycle_2 1/1 -> fcp = (50 + 100) / 2 = 75
    # all:    cycle_1 2/3, cycle_2 1/2 -> overall = (66.67 + 50) / 2
    rows = [
        ("single", "c1", "B"),
        ("single", "c2", "A"),
        ("cross", "c1", "B"),
        ("cross", "c1", "A C"),
        ("cross", "c2", "B"),
    ]
    samples = [
        _s(answer="B", options=dict(HR_OPTS), category=c, sid=str(i), extra={"cycle_category": cy})
        for i, (c, cy, _) in enumerate(rows)
    ]
    rep = hrbench.score(samples, {str(i): o for i, (_, _, o) in enumerate(rows)}, benchmark="hrbench-8k")
    assert rep.benchmark == "hrbench-8k"
    assert rep.headline["fsp"] == pytest.approx(50.0)
    assert rep.headline["fcp"] == pytest.approx(75.0)
    assert rep.headline["overall"] == pytest.approx((200 / 3 + 50) / 2)
    assert rep.metrics["judge_needed"] == 1  # "A C"


# ----------------------------------------------------------------------------------------------
# LRS-VQA (Script/evaluation_LRSVQA.py)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mini_wordnet(tmp_path, monkeypatch):
    from test_eval_support import make_mini_wordnet

    d = make_mini_wordnet(tmp_path / "wn")
    monkeypatch.setenv("UHRBAT_WORDNET_DIR", str(d))
    wn = wordnet.get_wordnet()
    assert wn is not None and str(d) in wn.source
    return wn


LRS_CASES = [
    ("yes", "Yes", True),  # lower-cased exact match.
    ("yes", " yes \n", True),  # output stripped (generation script) then lower-cased.
    ("yes", "Yes.", False),  # punctuation defeats both rules ("yes." has no synset).
    ("2", "two", True),  # WordNet: "2" and "two" share a synset.
    ("car", "Automobile", True),  # synonyms.
    ("car", "cars", True),  # morphy lemmatises "cars" -> car.
    ("white", "red", False),
    ("car", "", False),  # empty output.
    ("car", "汽车", False),  # non-English: no synset.
    ("rural", "the answer is rural", False),  # verbose: neither equal nor a single lemma.
]


@pytest.mark.parametrize("gt,output,ok", LRS_CASES)
def test_lrs_rule(mini_wordnet, gt, output, ok):
    s = _s(answer=gt, options={}, lines=[], category="count", sid="FAIR_1")
    assert lrs_vqa.correct(lrs_vqa.extract(output, s), s) is ok


def test_lrs_ground_truth_not_stripped(mini_wordnet):
    # Official: gt.lower() only; a stray space in the ground truth makes exact match fail.
    s = _s(answer="yes ", options={}, lines=[], category="c", sid="STAR_1")
    assert lrs_vqa.correct(lrs_vqa.extract("yes", s), s) is False


def test_lrs_subsets_oa_aa(mini_wordnet):
    specs = [
        ("FAIR_1", "count", "2", "two"),
        ("FAIR_2", "count", "3", "4"),
        ("FAIR_3", "color", "white", "white"),
        ("GLH-Bridge_1", "rural", "rural", "urban"),
        ("STAR_1", "category", "car", "auto"),
    ]
    samples = [_s(answer=g, options={}, lines=[], category=c, sid=i) for i, c, g, _ in specs]
    rep = lrs_vqa.score(samples, {i: o for i, _, _, o in specs})
    # FAIR: 2/3 right; AA = mean(count 1/2, color 1/1) = 75.
    assert rep.headline["FAIR"] == pytest.approx(200 / 3)
    assert rep.metrics["FAIR/AA"] == pytest.approx(75.0)
    assert rep.headline["GLH-Bridge"] == 0.0
    assert rep.headline["STAR"] == 100.0
    assert rep.headline["mean"] == pytest.approx((200 / 3 + 0 + 100) / 3)
    assert "WordNet" in rep.meta["wordnet"]


def test_wordnet_shared_synset_equals_path_similarity(mini_wordnet):
    for a, b in [("2", "two"), ("cars", "automobile"), ("white", "car"), ("country", "rural_area"), ("", "two")]:
        assert mini_wordnet.are_synonyms(a, b) == mini_wordnet.path_similarity_rule(a, b)


def test_lrs_without_wordnet_refuses_unless_exact_match_is_asked_for(monkeypatch, mini_wordnet):
    from uhrbat.errors import ConfigError

    s = _s(answer="2", options={}, lines=[], category="count", sid="FAIR_1")
    # WordNet present: "two" is a synonym of "2" (official rule) ...
    assert lrs_vqa.score([s], {"FAIR_1": "two"}).headline["FAIR"] == 100.0
    # ... but exact-match-only scoring, asked for by name, ignores it even when installed
    rep = lrs_vqa.score([s], {"FAIR_1": "two"}, lrs_synonyms="none")
    assert rep.headline["FAIR"] == 0.0 and "exact match only" in rep.meta["wordnet"]
    assert benchmarks.score("lrs-vqa", [s], {"FAIR_1": "two"}, lrs_synonyms="none").headline["FAIR"] == 0.0
    # WordNet missing: one line with the fix instead of a silently lower score
    monkeypatch.setattr(wordnet, "get_wordnet", lambda: None)
    for call in (
        lambda: lrs_vqa.score([s], {"FAIR_1": "two"}),
        lambda: benchmarks.check_score_options("lrs-vqa", lrs_synonyms=None),
    ):
        with pytest.raises(ConfigError, match="wordnet-base") as e:
            call()
        assert "--lrs-synonyms none" in str(e.value) and "\n" not in str(e.value)
    assert lrs_vqa.score([s], {"FAIR_1": "2"}, lrs_synonyms="none").headline["FAIR"] == 100.0
    with pytest.raises(ConfigError, match="--lrs-synonyms must be one of"):
        lrs_vqa.check_options("maybe")
    with pytest.raises(ConfigError, match="--lrs-synonyms does not apply to xlrs"):
        benchmarks.check_score_options("xlrs", lrs_synonyms="none")


# ----------------------------------------------------------------------------------------------
# report schema, errors, robust and logits views
# ----------------------------------------------------------------------------------------------


def test_report_schema_and_error_rows():
    bad = Sample(id="9", row=3, error="row 3: missing answer / ground truth")
    samples = [
        _s(sid="1", category="Counting/Overall counting"),
        bad,
        _s(sid="2", category="Counting/Overall counting"),
    ]
    rep = benchmarks.score("xlrs", samples, {"1": "B", "9": "B", "extra": "A"})
    d = rep.to_dict()
    assert list(d)[:7] == ["benchmark", "n", "n_errors", "headline", "metrics", "per_category", "per_sample"]
    assert d["n"] == 3
    assert d["n_errors"] == 2  # the malformed row and the id with no prediction
    assert d["per_sample"] == {"1": True, "9": False, "2": False}
    assert d["headline"]["weighted_avg"] == pytest.approx(100 / 3)  # errors count in the denominator
    assert d["meta"]["n_unmatched_predictions"] == 1 and d["meta"]["n_missing_predictions"] == 1


def test_prediction_error_rows_are_wrong():
    s = _s(sid="1", category="Counting/Overall counting")
    rep = benchmarks.score("xlrs", [s], {"1": Prediction(id="1", output=None, error="ImageLoadError: bad")})
    assert rep.per_sample == {"1": False} and rep.n_errors == 1


@pytest.mark.parametrize(
    "output,expected",
    [
        ("B", {"B"}),
        ("(B).", {"B"}),
        ("The answer is (B)", {"B"}),
        ("A, C", {"A", "C"}),
        ("A and C", {"A", "C"}),
        ("AC", {"A", "C"}),
        ("B. Building", {"B"}),
        ("Answer: D", {"D"}),
        ("I think the answer is C.", {"C"}),
        ("A building with a red roof", None),
        ("b", None),
        ("", None),
        ("答案是B", None),
        ("F", None),
    ],
)
def test_robust_letters(output, expected):
    got = robust_letters(output, "ABCD")
    assert (set(got) if got is not None else None) == expected


def test_robust_and_logit_views_reported_beside_official():
    s1 = _s(sid="1", category="Counting/Overall counting")
    s2 = _s(sid="2", category="Counting/Overall counting")
    preds = {
        "1": Prediction(id="1", output="B. Building", logit_choice="B"),
        "2": Prediction(id="2", output="B", logit_choice="C"),
    }
    rep = benchmarks.score("xlrs", [s1, s2], preds)
    assert rep.headline["weighted_avg"] == 50.0  # official: "B. Building" -> {B, D}
    assert rep.metrics["robust/weighted_avg"] == 100.0
    assert rep.metrics["logits/weighted_avg"] == 50.0
