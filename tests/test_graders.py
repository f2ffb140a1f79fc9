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
