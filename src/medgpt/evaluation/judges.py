"""Judges of a win rate: which of two answers to the same question is better, for every question both sides
answered. Each question's outcome is 1 (A wins), 0.5 (tie) or 0 (B wins); the win rate is their mean, with a
bootstrap interval over questions.

- `RewardModelJudge`: a reward model (`medgpt rm` output) scores both answers to A's prompt; equal scores or
  identical answers tie. Give one that the compared models were NOT trained against, or the number measures how
  well they learnt to please it (the pipeline marks such a judge).
- `EndpointJudge`: any OpenAI-compatible chat endpoint (`medgpt serve` of a larger model, vLLM, a hosted API)
  asked a fixed pairwise prompt twice per question, A first and B first; A wins a question only when the two
  orders together prefer it (one win and one tie count as a win), so a judge that always prefers the first
  answer gives ties, not wins. The API key, if the endpoint wants one, is read from $MEDGPT_JUDGE_API_KEY.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request

from medgpt.evaluation.choices import answer_letters
from medgpt.evaluation.intervals import bootstrap_mean

logger = logging.getLogger(__name__)

API_KEY_ENV = "MEDGPT_JUDGE_API_KEY"
JUDGE_SYSTEM = "You are an impartial judge of answers to medical questions."
JUDGE_PROMPT = """Which answer to the question below is better: more accurate, more helpful and safer for the \
person asking? Judge the content, not the length of the answers or the order in which they appear.

[Question]
{question}

[Answer A]
{first}

[Answer B]
{second}

Reply with one letter: A if answer A is better, B if answer B is better, C if they are equally good."""


def summary(outcomes: list[float], judge: str, seed: int = 0) -> dict:
    """win_rate (ties count half) with its bootstrap interval, and the counts."""
    n = len(outcomes)
    if not n:
        raise ValueError("a win rate needs at least one question both sides answered")
    return {"win_rate": sum(outcomes) / n, "win_rate_ci": bootstrap_mean(outcomes, seed), "win_n": n,
            "wins": sum(o == 1 for o in outcomes), "losses": sum(o == 0 for o in outcomes),
            "ties": sum(o == 0.5 for o in outcomes), "judge": judge}


class RewardModelJudge:
    def __init__(self, name: str, scorer):
        self.name, self.scorer = name, scorer  # a RewardModelScorer

    @classmethod
    def load(cls, path: str, name: str | None = None, **load_kwargs) -> "RewardModelJudge":
        from medgpt.models.reward import RewardModelScorer

        return cls(name or path, RewardModelScorer.load(path, **load_kwargs))

    def outcomes(self, rows_a: list[dict], rows_b: list[dict]) -> list[float]:
        from medgpt.evaluation.rewards import reward_outcomes

        return reward_outcomes(self.scorer, rows_a, rows_b)


class EndpointJudge:
    def __init__(self, url: str, model: str | None = None, name: str | None = None, timeout: float = 300):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.name = name or url
        self.timeout = timeout
        self.model = model or self._first_model()
        self.unparsed = 0  # verdicts that named no answer (counted as ties)

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            raise ValueError(f"judge {self.base}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise ValueError(f"judge {self.base}{path} cannot be reached ({err}); is the server running?") from None

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise ValueError(f"judge {self.base} lists no model: give judge_model_name")
        return models[0]["id"]

    def verdict(self, question: str, first: str, second: str) -> float:
        """1 when the first answer is judged better, 0 the second, 0.5 a tie or no verdict."""
        body = {"model": self.model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                             {"role": "user", "content": JUDGE_PROMPT.format(question=question, first=first,
                                                                             second=second)}]}
        reply = self._request("/chat/completions", body)["choices"][0]["message"].get("content") or ""
        letter = answer_letters(reply, "ABC")
        if letter not in ("A", "B", "C"):
            self.unparsed += 1
            return 0.5
        return {"A": 1.0, "B": 0.0, "C": 0.5}[letter]

    def outcomes(self, rows_a: list[dict], rows_b: list[dict]) -> list[float]:
        from tqdm.auto import tqdm

        results = []
        for a, b in tqdm(list(zip(rows_a, rows_b)), desc=f"judging ({self.model})", unit="question", leave=False):
            if a["answer"].strip() == b["answer"].strip():
                results.append(0.5)
                continue
            both = self.verdict(a["question"], a["answer"], b["answer"]) + (1 - self.verdict(a["question"], b["answer"], a["answer"]))
            results.append(1.0 if both > 1 else 0.0 if both < 1 else 0.5)
        if self.unparsed:
            logger.warning("judge %s: %d verdicts named no answer and counted as ties", self.name, self.unparsed)
        return results


def make_judge(spec: str, name: str | None = None, model_name: str | None = None, **load_kwargs):
    """A URL -> EndpointJudge; anything else is a reward-model directory."""
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec, model_name, name)
    return RewardModelJudge.load(spec, name, **load_kwargs)
