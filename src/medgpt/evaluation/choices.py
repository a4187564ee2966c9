"""The one reader of the option letter(s) an answer picks, shared by generative MCQ evaluation and the RL
`choice_match` reward: "Answer: B", "The answer is (C).", "Answer: I think it is C", "答案是C", "故选B", "选 ABD",
"B. Insulin", a last line "D".

Rules, in order of what they protect against:
- The last stated choice wins, not the first mention: "The answer is A. Wait, no: the answer is C." -> C.
- A stated choice is a letter after a cue (answer / choice / option ... is, 答案, 选), after a verb of choosing
  ("I choose B", "it is C", "would be D"), or before a verdict ("C is correct", "B项正确"). Bare letters in running
  text ("vitamin A", "type B") are not choices. When nothing is stated, a reply that starts with a letter
  ("B", "B. Insulin", "(C) the liver") or ends with a line holding only one ("...\nD") picks it.
- Only capital letters among the question's option letters count (A-H when they are not known, so "I" is never
  read as an option there); even on a question with an option I, "I" followed by a word ("I think", "I'd") is
  the pronoun. The article "A" only counts where a letter is expected.
- Several letters stated together ("ABD", "A, B and D", "A、B、D") are a multiple-answer choice, returned in
  alphabetical order; a single-answer question answered so is simply wrong (hedging earns nothing).
"""

from __future__ import annotations

import re
import unicodedata

ALL_LETTERS = "ABCDEFGH"  # when the question's letters are unknown (the RL reward): "I" is never an option
_SEPARATOR = r"(?:\s*(?:,|，|、|/|&|和|与|及|\band\b|\bor\b)?\s*)"
# A run of letters ("B", "ABD", "A, B and D"), each not glued to a following word character.
_LETTERS = rf"([A-J](?:{_SEPARATOR}[A-J])*)(?![A-Za-z0-9])"
_OPEN = r"[\s*:：=]*[(\[（【]?\s*"
CUES = (
    # English: "answer: B", "the correct answer is (C)", "final answer would be D", "choice B", "option (A)"
    re.compile(rf"(?i:answer|choice|option)s?(?i:\s+(?:is|are|would be|should be|will be|must be))?{_OPEN}{_LETTERS}"),
    # English filler after a cue or alone: "Answer: I think it is C", "so it's B", "I choose D", "I'd go with A"
    re.compile(rf"(?i:\b(?:is|are|be|'s|choose|chose|pick|picked|select|selected|go with|opt for))"
               rf"(?i:\s+(?:option|choice))?{_OPEN}{_LETTERS}"),
    # Chinese: "答案是C", "答案：ABD", "正确答案为（B）", "故选C", "应选 B", "选择D", "选项C"
    re.compile(rf"(?:答案|答)\s*(?:应该|应|就)?\s*(?:是|为|选)?{_OPEN}{_LETTERS}"),
    re.compile(rf"选(?:择|项)?{_OPEN}{_LETTERS}"),
    # A verdict after the letter: "C is correct", "C is the answer", "B项正确", "C 正确"
    re.compile(rf"(?<![A-Za-z]){_LETTERS}\s*(?:\)|）)?\s*(?i:is (?:the )?(?:correct|right|best|answer)|项?(?:正确|是正确的|对))"),
)
LEADING = re.compile(rf"^\W{{0,3}}{_LETTERS}\s*(?:[).:：、\]）]|$)")
LAST_LINE = re.compile(r"^\W{0,3}([A-J])\W{0,3}$")
PRONOUN_AFTER = re.compile(r"\s+[a-z]|['’]")  # "I think", "I'd": the pronoun


def answer_letters(text: str, letters: str = ALL_LETTERS) -> str | None:
    """The letter(s) the answer picks, alphabetically ("C", "ABD"), or None when it states no choice among
    `letters` (the question's option letters)."""
    text = unicodedata.normalize("NFKC", text or "")
    stated = []
    for pattern in CUES:
        for match in pattern.finditer(text):
            picked = _letters_at(text, match, letters)
            if picked:
                stated.append((match.end(1), picked))
    if stated:
        return max(stated)[1]  # the last stated choice
    start = LEADING.match(text)
    if start and _letters_at(text, start, letters):
        return _letters_at(text, start, letters)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = LAST_LINE.match(lines[-1]) if lines else None
    if last and last.group(1) in letters and not (last.group(1) == "I" and len(lines[-1].strip()) > 1):
        return last.group(1)
    return None


def _letters_at(text: str, match: re.Match, letters: str) -> str | None:
    """The letters of a match's run, cut before the first that is not an option or is the pronoun "I"."""
    picked = []
    for found in re.finditer(r"[A-J]", match.group(1)):
        letter = found.group()
        after = text[match.start(1) + found.end():]
        if letter not in letters or (letter == "I" and PRONOUN_AFTER.match(after)):
            break
        picked.append(letter)
    return "".join(sorted(set(picked))) or None
