"""`zerotrain serve` as a user runs it: one server process for the module, driven by the real
`openai` client, curl and raw HTTP, checked against transformers' own greedy decoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.helpers import ROOT, free_port, launcher_env

pytestmark = pytest.mark.system

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # the OpenAI base_url: http://127.0.0.1:PORT/v1
    model: str
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="x", max_retries=0, timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """Status and JSON body of a raw POST (errors included)."""
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(base_model_dir, tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.apps.cli", "serve", str(base_model_dir), "--port", str(port)],
                            cwd=ROOT, env=launcher_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not answer (exit status {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Server(proc, url, base_model_dir.name, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def reference(base_model_dir):
    """The served model and tokenizer, loaded in the test to decode with transformers directly."""
    import torch

    from engine.apps.generate import load_for_inference

    torch.set_num_threads(1)
    return load_for_inference(base_model_dir)


def _greedy(reference, prompt_ids: list[int], max_new_tokens: int) -> str:
    import torch

    model, tokenizer = reference
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client().models.list().data] == [server.model]
    assert server.url in server.log.read_text()  # the URL is printed for the user


def test_chat_greedy_matches_generate_and_streams_the_same_text(server, reference):
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    prompt_ids = reference[1].apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert text == _greedy(reference, prompt_ids, 24)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.choices[0].finish_reason == ("length" if whole.usage.completion_tokens == 24 else "stop")

    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_greedy_matches_generate_stream_and_seeded_stop(server, reference):
    client = server.client()
    prompt = "First Citizen:"
    whole = client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=20)
    prompt_ids = reference[1](prompt, add_special_tokens=False)["input_ids"]
    assert whole.choices[0].text == _greedy(reference, prompt_ids, 20)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    streamed = client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text

    # Sampling with a seed repeats itself; a stop sequence cuts the text before its first occurrence.
    sampled = [client.completions.create(model=server.model, prompt=prompt, temperature=1, seed=7, max_tokens=40)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    text = sampled[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2, f"the sampled text is too short to pick a stop sequence from: {text!r}"
    expected = text[:text.find(stop)]
    cut = client.completions.create(model=server.model, prompt=prompt, temperature=1, seed=7, max_tokens=40,
                                    stop=[stop, "\x00never"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model=server.model, prompt=prompt, temperature=1, seed=7, max_tokens=40,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_curl(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": server.model, "messages": MESSAGES, "max_tokens": 5, "temperature": 0})
    curl = ["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json", "-d"]
    out = subprocess.run([*curl, body, f"{server.url}/chat/completions"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    answer = json.loads(out.stdout)
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] <= 5
    stream = json.dumps({"model": server.model, "prompt": "ROMEO:", "max_tokens": 5, "stream": True})
    out = subprocess.run([*curl, stream, "-N", f"{server.url}/completions"], capture_output=True, text=True, timeout=60)
    events = [line for line in out.stdout.splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), out.stdout


@pytest.mark.parametrize("path, body, param", [
    ("/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, "model"),  # not the served model
    ("/chat/completions", {"temperature": 0}, "messages"),  # no messages
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
    ("/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/completions", {"prompt": "ROMEO " * 400}, "prompt"),  # longer than the context
    ("/completions", b"{not json", None),
])
def test_bad_requests_get_openai_errors(server, path, body, param):
    status, answer = server.post(path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"] and answer["error"]["code"] is None


def test_bad_request_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(model=server.model, messages=MESSAGES, n=2)
    assert raised.value.status_code == 400 and raised.value.param == "n" and "n=2" in raised.value.message


def test_max_tokens_is_capped_at_the_context(server, base_model_dir):
    context = json.loads((base_model_dir / "config.json").read_text())["max_position_embeddings"]
    done = server.client().completions.create(model=server.model, prompt="ROMEO:", temperature=0,
                                              max_tokens=10 * context)
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == context - done.usage.prompt_tokens


def test_concurrent_requests_do_not_mix(server):
    client = server.client()
    prompts = ["First Citizen:", "All: Speak, speak."]

    def chat(prompt: str) -> str:
        return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=60).choices[0].message.content

    def streamed(prompt: str) -> str:
        return "".join(c.choices[0].text for c in client.completions.create(
            model=server.model, prompt=prompt, temperature=0, max_tokens=60, stream=True))

    calls = [(chat, prompts[0]), (streamed, prompts[1])]
    alone = [call(prompt) for call, prompt in calls]
    together: list[str | None] = [None, None]
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        together[i] = calls[i][0](calls[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def test_sigterm_exits_cleanly(server):
    server.proc.terminate()
    assert server.proc.wait(10) == 0, server.log.read_text()[-3000:]
