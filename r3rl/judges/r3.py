"""R3's VLM judges (sen-ye/R3 `train/reward_func.py`): the requests R3 sends, and its answers read.

Four judges, each a `vlm_judge` mode; for the same record and image the chat request is R3's, byte
for byte (its system and user texts, text before image, the image as a default-quality JPEG data
URL, temperature 0, top_p 0.9, max_tokens 4096):

- `r3_geneval_plus` (R3's `geneval_plus_train_reward`, GenEval++ training): system prompt
  `GENEVAL_TRAIN_SYSTEM_PROMPT`, user text "Instruction: P\\n\\nExplanation: CHECKLIST"; the
  verdict is the JSON object's `correct` (1 or 0).
- `r3_geneval_plus_eval` (`geneval_plus_eval_reward`, GenEval++ evaluation): the same with the
  eval system prompt (which also asks for a `reason`) and "Instruction:\\nP\\n\\nExplanation
  checklist:\\nCHECKLIST".
- `r3_vqa` (`vqa_reward_fn`, TIIF training): no system prompt; the record's `yn_question_list`
  numbered "Q1: ..." in `YN_PROMPT`; the answer is a JSON object of yes/no answers; the score is
  the share that equals `yn_answer_list` (case and spaces ignored), rounded to 2 decimals as R3 does.
- `r3_tiif` (`tiif_reward_fn`, TIIF evaluation): no system prompt; the questions, stripped, one a
  line in `TIIF_PROMPT`; one "yes"/"no" line per question; the share that equals the expected
  answers. R3 compares the judge's lower-cased answer with the expected answer *as written*, so
  its 251 "Yes" answers in test_TIIF.jsonl never match; r3rl ignores case unless `exact_case`.

Where R3 scores 0 (no JSON, a JSON error, no `correct`, a count of answers unlike the count of
questions, a failed request), these give `None`: the sample is masked and counted, never a 0.
"""

from __future__ import annotations

import json
import re
from typing import Any

R3_MODES = ("r3_geneval_plus", "r3_geneval_plus_eval", "r3_vqa", "r3_tiif")
R3_MAX_TOKENS = 4096  # GeneralLLMServer's default_generation_params
R3_TOP_P = 0.9
R3_TEMPERATURE = 0.0

GENEVAL_TRAIN_SYSTEM_PROMPT = """You are an expert image evaluator.

Your task is to determine whether the given image faithfully satisfies the visual instruction and the expectation checklist.

Follow these rules strictly:
1. The image must match **all** expectations, including:
   - Object classes
   - Counts of each object
   - Colors of each object
   - Spatial position within the image (e.g., "above", "below", based on real pixel position)
   - Size and relative scale of objects
2. The image must appear as a **natural, coherent, photo-like single image**.
   - Do NOT allow stylized images (e.g., cartoons, sketches, anime).
   - Do NOT allow collage-style or multi-panel images. Only one consistent, realistic scene is acceptable.
3. Be very strict and conservative in your judgment.

Return your result as a JSON object using this format:
{
  "correct": 1 if the image fully satisfies all expectations, else 0,
}
"""

GENEVAL_EVAL_SYSTEM_PROMPT = """You are an expert image evaluator.

Your task is to determine whether the given image faithfully satisfies the visual instruction and the expectation checklist.

Follow these rules strictly:
1. The image must match **all** expectations, including:
   - Object classes
   - Counts of each object
   - Colors of each object
   - Spatial position within the image (e.g., "above", "below", based on real pixel position)
   - Size and relative scale of objects
2. The image must appear as a **natural, coherent, photo-like single image**.
   - Do NOT allow stylized images (e.g., cartoons, sketches, anime).
   - Do NOT allow collage-style or multi-panel images. Only one consistent, realistic scene is acceptable.
3. Be very strict and conservative in your judgment. 

Return your result as a JSON object using this format:
{
  "correct": 1 if the image fully satisfies all expectations, else 0,
  "reason": "You may explain in detail what is missing or incorrect"
}
"""

YN_PROMPT = """
You are tasked with conducting a careful examination of the provided image. Based on the content of the image, please answer the questions according to the instructions:

Questions:
##YNQuestions##

Instructions:
1. Each question is numbered and formatted as "Q1:", "Q2:", etc.
2. Answer each question with either yes or no.
3. Return your answers in JSON format only.
4. The JSON should contain the question number as the key and the answer (yes or no) as the value.
5. The order of answers must correspond exactly to the order of the questions.
6. Do not include any explanations, reasoning, or additional content - only the JSON output.
7. Ensure the number of answers equals the number of questions.

Output format example:
{
  "Q1": "yes",
  "Q2": "no",
  "Q3": "yes",
}
"""

TIIF_PROMPT = """
You are tasked with conducting a careful examination of the provided image. Based on the content of the image, please answer the following yes or no questions:

Questions:
##YNQuestions##

Note that:
1. Each answer should be on a separate line, starting with "yes" or "no", followed by the reason.
2. The order of answers must correspond exactly to the order of the questions.
3. Each question must have only one answer.
4. Directly return the answers to each question, without any additional content.
5. Each answer must be on its own line!
6. Make sure the number of output answers equal to the number of questions!
"""

_SLOT = "##YNQuestions##"


def _clause(item: dict) -> str:
    """One include as R3 words it: '[color-colored] [size] N class(s) located in the R part ...'."""
    count = item.get("count", 1)
    noun = f"{count} {item['class']}{'s' if count > 1 else ''}"
    attributes = [f"{item['color']}-colored"] if item.get("color") else []
    attributes += [item["size"]] if item.get("size") else []
    if attributes:
        noun = " ".join([*attributes, noun])
    where = (
        f"located in the {item['region']} part of the image"
        if item.get("region")
        else "present in the image"
    )
    return f"- {noun} {where}."


def checklist(record: dict) -> str:
    """R3's `metadata_to_explanation`: the expectations of a GenEval(++) record, one per line."""
    lines = [_clause(item) for item in record.get("include", [])]
    for item in record.get("exclude", []):
        count = item.get("count", 1)
        lines.append(
            f"- No more than {count - 1} {item['class']}{'s' if count > 1 else ''} should appear."
        )
    return "This image should contain:\n" + "\n".join(lines)


def r3_texts(mode: str, prompt: str, record: dict) -> tuple[str | None, str]:
    """(system prompt or None, user text) of R3's request in `mode` for one record."""
    if mode == "r3_geneval_plus":
        return (
            GENEVAL_TRAIN_SYSTEM_PROMPT,
            f"Instruction: {prompt.strip()}\n\nExplanation: {checklist(record)}",
        )
    if mode == "r3_geneval_plus_eval":
        return (
            GENEVAL_EVAL_SYSTEM_PROMPT,
            f"Instruction:\n{prompt.strip()}\n\nExplanation checklist:\n{checklist(record)}",
        )
    questions = record.get("yn_question_list") or []
    if mode == "r3_vqa":
        return None, YN_PROMPT.replace(
            _SLOT, "\n".join(f"Q{i}: {q}" for i, q in enumerate(questions, 1))
        )
    if mode == "r3_tiif":
        return None, TIIF_PROMPT.replace(_SLOT, "\n".join(q.strip() for q in questions))
    raise ValueError(f"not an R3 judge mode: {mode!r}")


def r3_messages(system: str | None, text: str, image_url: str) -> list[dict]:
    """R3's GeneralLLMServer._build_messages: the stripped system prompt when there is one, then one
    user turn with the text first and the image after it."""
    messages: list[dict[str, Any]] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    messages.append({"role": "user", "content": content})
    return messages


def json_object(text: str) -> dict | None:
    """R3's `extract_json_from_response` without its fallbacks: a ```json fence stripped, then the
    text from the first '{' to the last '}' parsed; None where R3 would score 0."""
    text = re.sub(r"\s*```$", "", re.sub(r"^```json\s*", "", text.strip()))
    match = re.search(r"\{[\s\S]*\}", text)
    if match is None:
        return None
    try:
        value = json.loads(match.group(0))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_verdict(text: str) -> float | None:
    """GenEval++: the strict JSON verdict `{"correct": 1 | 0, ...}`; None for anything else."""
    obj = json_object(text)
    correct = None if obj is None else obj.get("correct")
    if isinstance(correct, (bool, int, float)) and correct in (0, 1):
        return float(correct)
    return None


def _norm(answer: str) -> str:
    return answer.lower().strip()


def read_vqa(text: str, expected: list[str]) -> float | None:
    """TIIF training: the JSON object's answers, in order, against the expected ones; the share
    right, rounded to 2 decimals (R3). None unless there is one string answer per question."""
    obj = json_object(text)
    if (
        obj is None
        or not expected
        or len(obj) != len(expected)
        or not all(isinstance(v, str) for v in obj.values())
    ):
        return None
    right = sum(_norm(p) == _norm(e) for p, e in zip(obj.values(), expected))
    return round(right / len(expected), 2)


def read_tiif(text: str, expected: list[str], exact_case: bool = False) -> float | None:
    """TIIF evaluation: lines starting with yes/no (others skipped), one per question, else None."""
    preds = [
        m.group(1).lower()
        for line in text.strip().split("\n")
        if (m := re.match(r"^(yes|no)\b", line.strip(), flags=re.IGNORECASE))
    ]
    if not expected or len(preds) != len(expected):
        return None
    right = sum(p == (e if exact_case else _norm(e)) for p, e in zip(preds, expected))
    return right / len(preds)


def read_r3(mode: str, text: str, record: dict, exact_case: bool = False) -> float | None:
    """The score of one answer in `mode`, in [0, 1], or None when it cannot be read."""
    if mode in ("r3_geneval_plus", "r3_geneval_plus_eval"):
        return read_verdict(text)
    expected = list(record.get("yn_answer_list") or [])
    if mode == "r3_vqa":
        return read_vqa(text, expected)
    return read_tiif(text, expected, exact_case)
