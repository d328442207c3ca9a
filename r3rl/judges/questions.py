"""Yes/no questions for a VLM judge, one per constraint of a GenEval-style prompt record.

Asking about one constraint at a time (rather than "does the image match the prompt?")
is what makes VQA-style judges reliable and gives partial credit: the score is the mean
over questions of P(answer is the expected one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """A question and the answer a correct image earns (exclusions expect "no")."""

    text: str
    expect_yes: bool = True


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s")


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _object(item: dict) -> str:
    """'red circle' / 'circle': the class with its colour, if the record names one."""
    return f"{item['color']} {item['class']}" if item.get("color") else str(item["class"])


def _include(item: dict, includes: list[dict]) -> list[Question]:
    count = int(item.get("count", 1))
    thing = _object(item)
    if count == 1:
        questions = [Question(f"Is there {_article(thing)} in the image?")]
    else:
        questions = [Question(f"Are there at least {count} {_plural(thing)} in the image?")]
    position = item.get("position")
    if position:
        relation, other = position[0], includes[int(position[1])]
        questions.append(
            Question(f"Is the {_object(item)} {relation} the {_object(other)} in the image?")
        )
    return questions


def geneval_questions(record: dict) -> list[Question]:
    """Questions for a prompt record; free-form `questions` in the record win, then GenEval
    `include`/`exclude` clauses, then one question about the whole prompt.

    GenEval semantics: an include of count N means "at least N"; an exclude of count N means
    "fewer than N" (counting prompts pair the two to mean "exactly").
    """
    if record.get("questions"):
        return [Question(str(q)) for q in record["questions"]]
    includes = list(record.get("include") or [])
    questions = [q for item in includes for q in _include(item, includes)]
    for item in record.get("exclude") or []:
        count, thing = int(item["count"]), str(item["class"])
        text = (
            f"Are there {count} or more {_plural(thing)} in the image?"
            if count > 1
            else f"Is there {_article(thing)} in the image?"
        )
        questions.append(Question(text, expect_yes=False))
    return questions or [Question(f'Does the image show "{record["prompt"]}"?')]
