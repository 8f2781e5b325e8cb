"""Pull the final answer out of a model's text: boxed expressions, letters, numbers.

Models answer in many shapes (``\\boxed{\\frac{1}{2}}``, "The answer is (C).", "#### 1,234"); each
extractor tries the most explicit form first and falls back to weaker evidence (the last letter or
number in the text), because a wrong fallback costs less than a missed explicit answer.
"""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def _clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_number(text: str) -> str | None:
    """The final number: boxed, then ``#### N``, then "answer is N", then the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        found = re.findall(_NUMBER, boxed.replace("{", " ").replace("}", " "))
        if found:
            return _clean_number(found[-1])
    for pattern in (rf"####\s*\$?\s*({_NUMBER})", rf"answer is[:\s]*\$?\s*({_NUMBER})"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _clean_number(found[-1])
    found = re.findall(_NUMBER, text)
    return _clean_number(found[-1]) if found else None


def extract_letter(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter: boxed, "answer is (X)", "Answer: X", then the last "(X)"."""
    cls = f"[{letters}]"
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.search(rf"\b({cls})\b", boxed.replace("\\text{", " "))
        if m:
            return m.group(1)
    for pattern in (rf"answer is[:\s]*\(?({cls})\b", rf"answer\s*[:=]\s*\(?({cls})\b", rf"\(({cls})\)"):
        found = re.findall(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0)
        if found:
            return found[-1].upper()
    m = re.match(rf"\s*\(?({cls})(?:[).:]|\s*$)", text)  # a bare leading "B)" / "B." / "B"
    return m.group(1) if m else None


def normalize_math(s: str) -> str:
    """A canonical string for comparing MATH answers (formatting, not algebra)."""
    s = s.strip().strip("$").rstrip(".")
    m = re.fullmatch(r"\\text\{(.*)\}", s)
    if m:
        s = m.group(1)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                 ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\!", ""), ("\\,", ""), ("\\ ", ""), (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s)  # trailing units
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if re.fullmatch(_NUMBER, s):
        s = _clean_number(s)
    return s


def math_equal(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    p, g = normalize_math(prediction), normalize_math(gold)
    if p == g:
        return True
    try:
        return abs(float(p) - float(g)) < 1e-6
    except ValueError:
        return False
