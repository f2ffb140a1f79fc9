import json

import pytest

from tuneloop.evaluate import graders

SCHEMA = json.load(open(__file__.replace("tests/test_graders.py", "examples/ticket-triage/schema.json")))
REFERENCE = json.dumps(
    {"category": "billing", "product": "ledgerly", "priority": "high", "needs_human": True, "summary": "Charged twice."}
)


def test_valid_answer_scores_full_marks():
    assert graders.json_valid(REFERENCE)
    assert graders.schema_valid(REFERENCE, SCHEMA)
    assert all(graders.field_matches(REFERENCE, REFERENCE).values())
    assert graders.exact_match(REFERENCE + "\n", REFERENCE)
    assert graders.rouge_l(REFERENCE, REFERENCE) == pytest.approx(1.0)


def test_one_wrong_field_costs_one_field_only():
    answer = json.loads(REFERENCE) | {"priority": "low"}
    fields = graders.field_matches(json.dumps(answer), REFERENCE)
    assert fields == {"category": True, "product": True, "priority": False, "needs_human": True, "summary": True}
    assert graders.schema_valid(json.dumps(answer), SCHEMA)  # still a valid answer, just a wrong one


def test_label_outside_the_enum_fails_the_schema_but_parses():
    answer = json.dumps(json.loads(REFERENCE) | {"category": "refund"})
    assert graders.json_valid(answer)
    assert not graders.schema_valid(answer, SCHEMA)


def test_malformed_json_scores_zero_everywhere():
    broken = REFERENCE[:-2]
    assert not graders.json_valid(broken)
    assert not graders.schema_valid(broken, SCHEMA)
    assert not any(graders.field_matches(broken, REFERENCE).values())


def test_fenced_json_is_accepted_and_case_ignored_for_strings():
    fenced = "```json\n" + REFERENCE.replace("Charged twice.", "charged twice.") + "\n```"
    assert graders.json_valid(fenced)
    assert all(graders.field_matches(fenced, REFERENCE).values())


def test_field_matches_does_not_apply_to_plain_text_references():
    assert graders.field_matches("hello", "a plain answer") is None


def test_rouge_l_orders_answers_by_overlap():
    reference = "the customer was charged twice for march"
    assert graders.rouge_l("customer charged twice in march", reference) > graders.rouge_l("printer broken", reference)
    assert graders.rouge_l("", reference) == 0.0


def test_free_text_fields_are_left_out_of_field_accuracy():
    fields = graders.categorical_fields(SCHEMA)
    assert fields == ["category", "product", "priority", "needs_human"]
    answer = json.dumps(json.loads(REFERENCE) | {"summary": "Different words entirely."})
    assert graders.field_matches(answer, REFERENCE, fields) == dict.fromkeys(fields, True)


def test_normalized_match_ignores_case_punctuation_articles_and_spacing():
    assert graders.normalized_match("  The Printer is BROKEN! ", "printer is broken")
    assert not graders.normalized_match("printer is fixed", "printer is broken")
    assert not graders.exact_match("The printer is broken!", "printer is broken")


def test_regex_match_searches_the_answer():
    assert graders.regex_match('{"priority": "urgent"}', r'"priority":\s*"(high|urgent)"')
    assert not graders.regex_match('{"priority": "low"}', r'"priority":\s*"(high|urgent)"')


def test_extract_label_from_json_field_or_plain_answer():
    assert graders.extract_label(REFERENCE, "category") == "billing"
    assert graders.extract_label(REFERENCE, "needs_human") == "true"
    assert graders.extract_label(REFERENCE[:-2], "category") is None  # malformed JSON: no label
    assert graders.extract_label(' "Billing."\n', None) == "billing"
    assert graders.enum_labels(SCHEMA, "priority") == ["low", "medium", "high", "urgent"]


def test_bleu_and_chrf_from_summed_statistics_equal_sacrebleu_corpus_scores():
    from sacrebleu.metrics import BLEU, CHRF

    answers = ["the customer was charged twice for march", "the app crashes on launch", "printer"]
    references = ["the customer was charged twice in march", "the android app crashes at launch", "a printer jam"]
    bleu = [sum(column) for column in zip(*graders.bleu_statistics(answers, references))]
    chrf = [sum(column) for column in zip(*graders.chrf_statistics(answers, references))]
    assert graders.bleu_from_statistics(bleu) == pytest.approx(BLEU().corpus_score(answers, [references]).score / 100)
    assert graders.chrf_from_statistics(chrf) == pytest.approx(CHRF().corpus_score(answers, [references]).score / 100)
    perfect = [sum(c) for c in zip(*graders.bleu_statistics(references, references))]
    assert graders.bleu_from_statistics(perfect) == pytest.approx(1.0)


def test_embedding_similarity_ranks_paraphrase_above_unrelated():
    pytest.importorskip("sentence_transformers")
    reference = "The customer was charged twice this month."
    close, far = graders.embedding_similarity(
        ["I was billed two times this month.", "The printer on floor three is jammed."], [reference, reference]
    )
    assert 0.0 <= far < close <= 1.0
    assert graders.embedding_similarity([reference], [reference])[0] == pytest.approx(1.0, abs=1e-4)


def test_classification_on_hand_built_answers():
    from tuneloop.evaluate.classification import INVALID, classify

    labels = ["billing", "bug", "how_to"]
    references = [json.dumps({"category": c}) for c in ("billing", "billing", "bug", "bug", "how_to")]
    answers = [
        json.dumps({"category": "billing"}),  # right
        json.dumps({"category": "refund"}),  # a label outside the label set
        json.dumps({"category": "bug"}),  # right
        json.dumps({"category": "billing"}),  # wrong but valid
        '{"category": "how_to"',  # malformed JSON
    ]
    truth = [graders.extract_label(r, "category") for r in references]
    predicted = [graders.extract_label(a, "category") for a in answers]
    result = classify(truth, predicted, labels)

    assert result["columns"] == [*labels, INVALID]
    assert result["confusion"] == [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]]
    assert result["accuracy"] == pytest.approx(2 / 5)
    billing, bug, how_to = (result["per_label"][name] for name in labels)
    assert (billing["precision"], billing["recall"], billing["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (bug["precision"], bug["recall"], bug["f1"]) == pytest.approx((1.0, 1 / 2, 2 / 3))
    assert (how_to["precision"], how_to["recall"], how_to["f1"], how_to["support"]) == (0.0, 0.0, 0.0, 1)
    assert result["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0.0) / 3)


def test_metric_set_on_a_json_answer_with_one_wrong_field_and_a_malformed_one():
    from tuneloop.evaluate.metrics import default_metrics, gate_keys, grade

    wrong_priority = json.dumps(json.loads(REFERENCE) | {"priority": "low"})
    specs = default_metrics(SCHEMA)
    graded = grade(specs, [REFERENCE] * 3, [REFERENCE, wrong_priority, REFERENCE[:-2]], SCHEMA)

    assert gate_keys(specs, SCHEMA) == ["schema_valid"]
    assert graded.per_row["schema_valid"] == [1.0, 1.0, 0.0]
    assert graded.per_row["field_accuracy"] == [1.0, 0.75, 0.0]  # four closed fields, one wrong
    assert graded.per_row["field.priority"] == [1.0, 0.0, 0.0]
    assert graded.per_row["category.accuracy"] == [1.0, 1.0, 0.0]
    assert graded.metrics["json_valid"] == pytest.approx(2 / 3)
    assert graded.classification["category"]["confusion"][0][-1] == 1  # the malformed answer: (invalid)


LINE_ITEMS = {"type": "object", "properties": {
    "vendor": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "required": ["name", "qty"],
                                         "properties": {"name": {"type": "string"}, "qty": {"type": "integer"},
                                                        "note": {"type": "string"}}}},
}}
LINE_REFERENCE = json.dumps({"vendor": "Acme", "items": [{"name": "Blue Widget", "qty": 2}, {"name": "bolt", "qty": 10}]})


@pytest.mark.parametrize("answer, expected", [
    ({"items": [{"name": "Blue Widget", "qty": 2}, {"name": "bolt", "qty": 10}]}, (2, 2, 2)),  # exact
    ({"items": [{"name": "  blue   WIDGET ", "qty": 2, "note": "x"}, {"name": "BOLT", "qty": 10}]}, (2, 2, 2)),  # case, space, extra field
    ({"items": [{"name": "Blue Widget", "qty": 2}]}, (1, 1, 2)),  # a missing item
    ({"items": [{"name": "Blue Widget", "qty": 2}, {"name": "bolt", "qty": 10}, {"name": "nut", "qty": 1}]}, (2, 3, 2)),  # an extra item
    ({"items": [{"name": "Blue Widget", "qty": "2"}, "bolt x10"]}, (0, 2, 2)),  # a wrong type: a string quantity, a string item
    ({"items": [{"name": "bolt", "qty": 10}, {"name": "bolt", "qty": 10}]}, (1, 2, 2)),  # one reference item matches once
    ("not json", (0, 0, 2)),
])
def test_list_items_are_matched_one_to_one_on_their_key_fields(answer, expected):
    from tuneloop.evaluate import graders

    text = answer if isinstance(answer, str) else json.dumps(answer)
    assert graders.item_counts(text, LINE_REFERENCE, "items", ["name", "qty"]) == expected


def test_item_precision_recall_and_f1():
    from tuneloop.evaluate import graders

    assert graders.item_scores((1, 1, 2)) == (1.0, 0.5, pytest.approx(2 / 3))
    assert graders.item_scores((2, 3, 2)) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert graders.item_scores((0, 0, 0)) == (1.0, 1.0, 1.0)  # nothing expected, nothing given
    assert graders.item_scores((0, 0, 2)) == (0.0, 0.0, 0.0)
    assert graders.item_counts('{"items": []}', '{"vendor": "x"}', "items", None) is None  # not applicable


def test_an_array_of_objects_in_the_schema_gets_item_metrics_by_default():
    from tuneloop.evaluate.metrics import default_metrics, grade

    specs = default_metrics(LINE_ITEMS)
    (items,) = [s for s in specs if s.name == "item_f1"]
    assert (items.field, items.keys, items.gate) == ("items", ["name", "qty"], False)
    answers = [json.dumps({"vendor": "Acme", "items": [{"name": "blue widget", "qty": 2}]})]
    metrics = grade([items], [LINE_REFERENCE], answers, LINE_ITEMS).metrics
    assert metrics == {"items.f1": pytest.approx(2 / 3), "items.precision": 1.0, "items.recall": 0.5}


def test_label_answers_are_scored_on_accuracy_and_macro_f1_by_default():
    from tuneloop.evaluate.metrics import default_metrics, gate_keys, grade

    train = ["positive", "negative", "neutral", "Positive."] * 10
    specs = default_metrics(None, train)
    assert [s.name for s in specs] == ["classification", "exact_match"]
    assert gate_keys(specs, None) == ["label.accuracy"] and specs[0].labels == ["negative", "neutral", "positive"]
    metrics = grade(specs, ["positive", "negative", "neutral"], ["Positive", "neutral", "neutral"], None).metrics
    assert metrics["label.accuracy"] == pytest.approx(2 / 3) and 0 < metrics["label.macro_f1"] < 1
    free_text = [f"a sentence about thing {i}" for i in range(40)]
    assert [s.name for s in default_metrics(None, free_text)] == ["rouge_l", "exact_match"]
    assert [s.name for s in default_metrics(None, [f"label {i}" for i in range(21)] * 3)][0] == "rouge_l"


def test_majority_class_rate_is_what_always_answering_the_training_mode_scores():
    from tuneloop.evaluate.metrics import default_metrics, majority_rates

    def answer(category, priority, needs_human):
        return json.dumps({"category": category, "product": "ledgerly", "priority": priority,
                           "needs_human": needs_human, "summary": "x"})

    train = [answer("bug", "low", False)] * 3 + [answer("billing", "high", True)] * 2 + ["not json"]
    test = [answer("bug", "high", True), answer("billing", "low", False), answer("bug", "low", True),
            answer("how_to", "medium", False)]
    rates = majority_rates(default_metrics(SCHEMA), train, test, SCHEMA)
    assert rates == {"field.category": 0.5, "field.product": 1.0, "field.priority": 0.5, "field.needs_human": 0.5,
                     "category.accuracy": 0.5}
    labels = default_metrics(None, ["Positive", "negative", "positive."] * 4)
    assert majority_rates(labels, ["Positive", "negative", "positive."] * 4, ["positive", "neutral"], None) == {
        "label.accuracy": 0.5}
    assert majority_rates(labels, None, ["positive"], None) == {}


def test_the_report_shows_the_majority_class_rate_beside_its_metric():
    from pathlib import Path

    from tuneloop.artifacts import EvalReport
    from tuneloop.evaluate.report import metric_header, metric_rows

    report = EvalReport(dir=Path("."), rows=4, baseline={"schema_valid": 0.0, "field.category": 0.0},
                        candidate={"schema_valid": 1.0, "field.category": 0.75}, majority={"field.category": 0.5})
    header, rows = metric_header(report), {row[0].strip(): row for row in metric_rows(report)}
    column = header.index("majority class")
    assert rows["accuracy: category"][column] == "50.0 %" and rows["schema compliance"][column] == ""
    assert "majority class" not in metric_header(EvalReport(dir=Path("."), rows=4, baseline={}, candidate={}))
