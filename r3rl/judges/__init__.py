"""Judges: remote scorers (VLMs served by vLLM, detectors, reward servers) behind one HTTP client.

`http` holds the retry/timeout/load-balancing rules, `chat` the OpenAI-compatible client,
`scoring` the parsers that turn answers into numbers, `questions` the per-constraint
questions built from GenEval-style prompt records, `r3` R3's own judges (requests and readers).
"""

from r3rl.judges.chat import ChatAnswer, ChatClient, encode_image, image_data_url, user_message
from r3rl.judges.http import HttpPool, JudgeStats, worst_case_s
from r3rl.judges.questions import Question, geneval_questions
from r3rl.judges.r3 import R3_MODES, checklist, r3_messages, r3_texts, read_r3
from r3rl.judges.scoring import (
    parse_json,
    parse_score,
    scores_from_json,
    yes_no_from_text,
    yes_probability,
    yes_score,
)

__all__ = [
    "R3_MODES",
    "ChatAnswer",
    "ChatClient",
    "HttpPool",
    "JudgeStats",
    "Question",
    "checklist",
    "encode_image",
    "geneval_questions",
    "image_data_url",
    "parse_json",
    "parse_score",
    "r3_messages",
    "r3_texts",
    "read_r3",
    "scores_from_json",
    "user_message",
    "worst_case_s",
    "yes_no_from_text",
    "yes_probability",
    "yes_score",
]
