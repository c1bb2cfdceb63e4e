"""Video-ChatGPT's GPT judge, behind any OpenAI-compatible endpoint.

The judge is configured by its base URL (`--judge-url`, e.g. `https://api.openai.com/v1` or a local
vLLM server), a model name (`--judge-model`, default `gpt-3.5-turbo` as in Video-ChatGPT) and the NAME of
the environment variable that holds the key (`--judge-key-env`, default `MGLLAVA_JUDGE_API_KEY`); the key
itself is never on the command line, in a file or in the code. Requests go through the `openai` client.

The prompts are Video-ChatGPT's `quantitative_evaluation/evaluate_activitynet_qa.py` (used by Video-LLaVA
and the MG-LLaVA reference for MSVD-QA and MSRVTT-QA), character for character, including their missing
spaces. Each reply is appended, as received, to a JSONL as it arrives, so a judge run that is interrupted
(or rate-limited) resumes; failed requests are recorded with their reason. How replies are read and how
failures count is the scoring pipeline's (`metrics.judge_summary_official` / `judge_summary_lmms_eval`):
under "official" a reply the scripts cannot read is asked for again, as Video-ChatGPT's loop does, up to
`rounds` times per run (and again on the next run); under "lmms-eval" only failed requests are asked again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..utils.io import JsonlWriter
from .metrics import JudgeReplyError, read_judge_reply

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


@dataclass(frozen=True)
class JudgeItem:
    key: str
    question: str
    answer: str
    prediction: str


@dataclass(frozen=True)
class GptJudge:
    base_url: str
    model: str = "gpt-3.5-turbo"
    key_env: str = "MGLLAVA_JUDGE_API_KEY"
    workers: int = 4
    timeout: float = 60.0
    max_retries: int = 2  # the client's retries of one request (transport errors, rate limits)
    rounds: int = 3  # passes over the questions still without a usable reply, per run

    @property
    def name(self) -> str:
        return f"gpt_judge:{self.model}"

    def client(self) -> Any:
        from openai import OpenAI

        key = os.environ.get(self.key_env)
        if not key:
            raise ValueError(
                f"the GPT judge reads its API key from the environment variable {self.key_env}, which is not "
                "set (choose another variable with --judge-key-env)"
            )
        return OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=self.max_retries)

    def ask(self, client: Any, item: JudgeItem) -> str:
        """The judge's reply text to one item; raises on transport errors."""
        completion = client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": USER_PROMPT.format(
                        question=item.question, answer=item.answer, prediction=item.prediction
                    ),
                },
            ],
        )
        return completion.choices[0].message.content or ""

    def file_name(self) -> str:
        return "judge-" + re.sub(r"[^A-Za-z0-9._-]+", "_", self.model) + ".jsonl"


def _verdict(judge: GptJudge, client: Any, item: JudgeItem) -> dict[str, Any]:
    from openai import OpenAIError

    record: dict[str, Any] = {"id": item.key, "model": judge.model, "prediction": item.prediction}
    try:
        record["reply"] = judge.ask(client, item)
    except OpenAIError as err:
        record["error"] = f"{type(err).__name__}: {err}"
    return record


def readable_official(record: dict[str, Any]) -> bool:
    """Whether the official scripts would keep this reply (else they ask again)."""
    try:
        read_judge_reply(record["reply"])
    except JudgeReplyError:
        return False
    return True


def needs_asking(record: dict[str, Any] | None, item: JudgeItem, reask_unreadable: bool) -> bool:
    """No reply for this prediction yet, a failed request, or (official) a reply the scripts cannot read."""
    if record is None or record.get("prediction") != item.prediction or "reply" not in record:
        return True
    return reask_unreadable and not readable_official(record)


def run_judge(
    judge: GptJudge, items: Iterable[JudgeItem], out_dir: str | Path, reask_unreadable: bool = True
) -> dict[str, dict[str, Any]]:
    """The latest record per item (`reply` text, or `error`), asking the judge about items without a usable
    reply in up to `judge.rounds` passes; records on disk for the same prediction are reused."""
    items = list(items)
    writer = JsonlWriter(Path(out_dir) / judge.file_name(), key=lambda r: r["id"])
    try:
        latest = {r["id"]: r for r in writer.records}
        client = None
        for _ in range(max(1, judge.rounds)):
            todo = [i for i in items if needs_asking(latest.get(i.key), i, reask_unreadable)]
            if not todo:
                break
            client = client or judge.client()
            logger.info("judging %d predictions with %s at %s", len(todo), judge.model, judge.base_url)
            with ThreadPoolExecutor(max_workers=max(1, judge.workers)) as pool:
                futures = [pool.submit(_verdict, judge, client, item) for item in todo]
                for future in tqdm(as_completed(futures), total=len(futures), desc="judge", unit="q"):
                    record = future.result()
                    writer.write(record)
                    latest[record["id"]] = record
    finally:
        writer.close()
    wanted = {i.key for i in items}
    return {k: v for k, v in latest.items() if k in wanted}
