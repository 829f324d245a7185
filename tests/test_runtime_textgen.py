"""Kind: unit (the built-in runtime's aiohttp app in process, no other servers). Text generation on
/v1/completions and /v1/chat/completions (issue 17, item 4): a user's class with complete()/chat()
(meshserve_testing.parrot), max_tokens, stop, n, usage, streaming in OpenAI's chunk format, and
bad parameters as OpenAI's 400s. The real `openai` client runs them through the gateway in
e2e/test_openai_generate.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from meshserve_loader.builtin import textgen
from meshserve_loader.builtin.codec import InferRequest, Tensor
from meshserve_loader.builtin.table import Runtime

PARROT = "meshserve_testing.parrot.Parrot"


def test_stop_strings_are_found_across_pieces_and_never_leak() -> None:
    s = textgen.StopScanner(("END", "\n\n"))
    assert s.feed("hello E") == ("hello ", False)  # "E" might start END: held back
    assert s.feed("N") == ("", False)
    assert s.feed("Dgame") == ("", True)
    s = textgen.StopScanner(("END",))
    assert s.feed("an E") == ("an ", False) and s.feed("xit") == ("Exit", False) and s.flush() == ""


def test_bad_parameters_name_the_param() -> None:
    for body, chat, param in [({"prompt": 3}, False, "prompt"), ({"prompt": "x", "max_tokens": 0}, False, "max_tokens"),
                              ({"prompt": "x", "n": 0}, False, "n"), ({"prompt": "x", "stop": ["a"] * 5}, False, "stop"),
                              ({"prompt": "x", "temperature": 3}, False, "temperature"), ({"prompt": "x", "stream": "yes"}, False, "stream"),
                              ({"prompt": "x", "logprobs": 2}, False, "logprobs"), ({"prompt": "x", "logprobs": 1}, False, "logprobs"),
                              ({"prompt": "x", "logprobs": 0}, False, "logprobs"), ({"prompt": "x", "echo": True}, False, "echo"),
                              ({"prompt": "x", "best_of": 3}, False, "best_of"), ({"messages": []}, True, "messages"),
                              ({"messages": [{"role": "robot", "content": "x"}]}, True, "messages[0].role"),
                              ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, True, "stream_options"),
                              ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
                               True, "tools"),
                              ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, True,
                               "response_format")]:
        try:
            textgen.parse(body, chat)
        except textgen.GenError as e:
            assert e.param == param, (body, e)
        else:
            raise AssertionError(f"{body} was accepted")
    # What asks for nothing is accepted, as the openai client may send it.
    textgen.parse({"prompt": "x", "logprobs": None, "echo": False, "best_of": 1, "suffix": None, "top_logprobs": 0}, False)
    textgen.parse({"messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}, True)


def _events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_runtime_generates_plain_and_streamed(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshserve_loader.builtin.http_api import build_rest_app

    async def go() -> None:
        rt = Runtime()
        await rt.load("parrot", "custom", str(tmp_path), {"implementation": PARROT})
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "x.txt").write_text("hi")
        await rt.load("sk", "string", str(tmp_path / "s"), {})  # generates nothing
        async with TestClient(TestServer(build_rest_app(rt))) as c:
            r = await c.post("/v1/completions", json={"model": "parrot", "prompt": "one two three", "max_tokens": 6})
            doc = await r.json()
            assert r.status == 200 and doc["object"] == "text_completion" and doc["id"].startswith("cmpl-"), doc
            (ch,) = doc["choices"]
            assert ch["text"] == "echo: one two three la la " and ch["finish_reason"] == "length" and ch["index"] == 0
            assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}

            r = await c.post("/v1/completions", json={"model": "x", "prompt": ["a b", "c"], "stop": "b", "n": 2, "seed": 7,
                                                      "max_tokens": 50}, headers={"mm-model-id": "parrot"})
            doc = await r.json()
            assert doc["model"] == "x" and [x["index"] for x in doc["choices"]] == [0, 1, 2, 3]
            assert [x["text"] for x in doc["choices"][:2]] == ["#7 echo: a ", "#8 echo: a "]  # ends before the stop string
            assert doc["choices"][0]["finish_reason"] == "stop" and doc["choices"][2]["finish_reason"] == "length"

            r = await c.post("/v1/chat/completions", json={"model": "parrot", "max_tokens": 3, "messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]})
            doc = await r.json()
            assert doc["object"] == "chat.completion" and doc["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi there "}
            assert doc["usage"]["prompt_tokens"] == 4 and doc["usage"]["completion_tokens"] == 3

            r = await c.post("/v1/chat/completions", json={"model": "parrot", "max_tokens": 3, "stream": True, "stream_options": {
                "include_usage": True}, "messages": [{"role": "user", "content": "hi there"}]})
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            ev = _events(await r.read())
            assert ev[-1] == "[DONE]" and ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-2] if e["choices"]) == "echo: hi there "
            assert ev[-3]["choices"][0]["finish_reason"] == "length" and ev[-2]["usage"]["completion_tokens"] == 3
            assert all(e["object"] == "chat.completion.chunk" and e["id"] == ev[0]["id"] for e in ev[:-1])

            r = await c.post("/v1/completions", json={"model": "parrot", "prompt": "a BOOM", "stream": True})
            ev = _events(await r.read())
            assert ev[-1] == "[DONE]" and "choked" in ev[-2]["error"]["message"]  # failed mid-stream: said in the stream
            assert "".join(e["choices"][0]["text"] for e in ev[:-2]) == "echo: a "

            for path, body, status, param in [
                ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
                ("/v1/completions", {"model": "parrot", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
                ("/v1/chat/completions", {"model": "parrot", "messages": "hi"}, 400, "messages"),
                ("/v1/completions", {"model": "sk", "prompt": "x"}, 400, "model"),
                ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True}, 404, "model"),
            ]:
                r = await c.post(path, json=body)
                err = (await r.json())["error"]
                assert r.status == status and err["param"] == param and set(err) == {"message", "type", "param", "code"}, (body, err)

        # The same class on the v2 path: prompts in, texts out, bounded though the parrot never ends.
        out = rt.infer("parrot", InferRequest([Tensor("prompt", "BYTES", [2], np.array([b"a b", b"c"], dtype=object))]))
        texts = [t.decode() for t in out["text"]]
        assert texts[0].startswith("echo: a b la ") and len(texts[1].split()) == textgen.DEFAULT_MAX_TOKENS["v2"]
        rt.close()

    asyncio.run(go())


def test_a_client_that_leaves_mid_stream_stops_the_model(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshserve_loader.builtin.http_api import build_rest_app

    (tmp_path / "model-settings.json").write_text(json.dumps({"implementation": PARROT, "parameters": {"extra": {"delay": 0.01}}}))

    async def go() -> None:
        rt = Runtime()
        await rt.load("parrot", "custom", str(tmp_path), {})
        async with TestClient(TestServer(build_rest_app(rt))) as c:
            # 100,000 pieces at 10 ms each would hold an inference thread for 17 minutes.
            r = await c.post("/v1/completions", json={"model": "parrot", "prompt": "x", "max_tokens": 100_000, "stream": True})
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            r.close()
            for _ in range(100):  # the run ends (and is counted) once the model saw it was cancelled
                if rt.models["parrot"].requests:
                    break
                await asyncio.sleep(0.05)
            assert rt.models["parrot"].requests == 1, "the model kept generating for a client that left"
        rt.close()

    asyncio.run(go())


def test_async_classes_generate_too() -> None:
    """MLServer users write async code: `async def complete` and async generators both serve."""

    class Async:
        async def complete(self, prompt: str, **_: Any) -> str:
            return "one two three"

        async def chat(self, messages: list, **_: Any):  # type: ignore[no-untyped-def]
            for w in ("a ", "b ", "c "):
                yield w

    choices, _ = textgen.generate(Async(), textgen.parse({"prompt": "x", "max_tokens": 2}, chat=False))
    assert choices[0].text == "one two " and choices[0].finish_reason == "length"
    choices, _ = textgen.generate(Async(), textgen.parse({"messages": [{"role": "user", "content": "x"}], "stop": "c"}, chat=True))
    assert choices[0].text == "a b " and choices[0].finish_reason == "stop"


def test_a_class_that_only_completes_serves_chat_with_the_messages_as_a_prompt() -> None:
    class Plain:  # takes no sampling parameters at all
        def complete(self, prompt: str) -> str:
            return prompt.replace("\n", " | ")

    req = textgen.parse({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                         "temperature": 0.5, "max_tokens": 50}, chat=True)
    choices, prompt = textgen.generate(Plain(), req)
    assert choices[0].text == "system: be brief | user: hi | assistant:" and prompt == 3


def test_token_array_prompts_go_through_the_class_detokenize(tmp_path: Path) -> None:
    """OpenAI's prompt shapes beyond text: one token array, or several. A class with
    detokenize() takes them (usage counts the tokens); one without gets a 400 naming `prompt`."""
    from aiohttp.test_utils import TestClient, TestServer

    from meshserve_loader.builtin.http_api import build_rest_app

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.py").write_text("class Plain:\n    def __init__(self, settings): pass\n"
                                                 "    def load(self): return True\n"
                                                 "    def complete(self, prompt): return prompt\n")
    (tmp_path / "plain" / "model-settings.json").write_text(json.dumps({"implementation": "model.Plain"}))

    async def go() -> None:
        rt = Runtime()
        await rt.load("parrot", "custom", str(tmp_path), {"implementation": PARROT})
        await rt.load("plain", "custom", str(tmp_path / "plain"), {})
        async with TestClient(TestServer(build_rest_app(rt))) as c:
            r = await c.post("/v1/completions", json={"model": "parrot", "prompt": [5, 6], "max_tokens": 3})
            doc = await r.json()
            assert r.status == 200 and doc["choices"][0]["text"] == "echo: t5 t6 ", doc
            assert doc["usage"]["prompt_tokens"] == 2
            r = await c.post("/v1/completions", json={"model": "parrot", "prompt": [[1], [2, 3]], "max_tokens": 2, "stream": True})
            ev = _events(await r.read())
            texts: dict[int, str] = {}
            for e in ev[:-1]:
                for ch in e["choices"]:
                    texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
            assert texts == {0: "echo: t1 ", 1: "echo: t2 "}
            for model, prompt, status in [("plain", [1, 2], 400), ("parrot", [1, -2], 400), ("parrot", [[1], []], 400),
                                          ("parrot", [1, "two"], 400), ("parrot", [True], 400)]:
                r = await c.post("/v1/completions", json={"model": model, "prompt": prompt})
                err = (await r.json())["error"]
                assert r.status == status and err["param"] == "prompt", (prompt, err)
            r = await c.post("/v1/completions", json={"model": "plain", "prompt": [1, 2]})
            assert "no detokenize(tokens) method" in (await r.json())["error"]["message"]
            r = await c.post("/v1/completions", json={"model": "plain", "prompt": "still fine"})
            assert (await r.json())["choices"][0]["text"] == "still fine"
        rt.close()

    asyncio.run(go())
