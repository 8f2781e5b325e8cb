import pytest

from diffmas_eval.answers import extract_letter, extract_number, last_boxed, math_equal


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{x^{2}+1}}", r"\sqrt{x^{2}+1}"),
    (r"\fbox{42}", "42"),
    (r"\boxed{\frac{1}{2}", None),  # unbalanced: no answer rather than a wrong one
    ("no box here", None),
])
def test_last_boxed_handles_nesting(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is $1,234.", "1234"),
    (r"Total: \boxed{18} dollars, not 20", "18"),
    (r"\boxed{\text{-3.50}}", "-3.50"),
    ("First 3 then 5, finally 7.0", "7"),
    ("nothing numeric", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Let me think. (A) is wrong. The answer is (C).", "C"),
    ("Answer: B", "B"),
    (r"\boxed{D}", "D"),
    (r"\boxed{\text{(B)}}", "B"),
    ("I pick (A) over (B)... final (D)", "D"),
    ("B) because", "B"),
    ("A fine question with no letter choice", None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_extract_letter_respects_the_option_set():
    assert extract_letter("The answer is (E).", "ABCDE") == "E"
    assert extract_letter("The answer is (E).", "ABCD") is None


@pytest.mark.parametrize("pred,gold,ok", [
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
    (r"\frac12", r"\frac{1}{2}", True),
    ("0.5", "1/2", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("10.0", "10", True),
    (r"90^\circ", "90", True),
    (r"\text{(C)}", "(C)", True),
    (None, "1", False),
])
def test_math_equal(pred, gold, ok):
    assert math_equal(pred, gold) is ok
