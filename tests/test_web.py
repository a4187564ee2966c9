"""The web UI: streamed answers, the side-by-side mode, and a real browser (Debian's Chromium via Playwright)."""

from __future__ import annotations

import shutil
import socket

import pytest

from medgpt.cli import main
from medgpt.data.records import Message
from medgpt.serve.engine import GenerationEngine, SamplingParams
from medgpt.serve.web import answer, build_ui, launch, side_by_side

CHROMIUM = shutil.which("chromium")
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)
QUESTION = "What is anaemia?"


@pytest.fixture(scope="module")
def engines(learnable_model_dir):
    # Two "models" that answer differently: the same weights prompted through two chat templates. fp32: the
    # streamed answer must equal batch generation's word for word (bf16 kernels round differently in each).
    return {"chatml": GenerationEngine.load(str(learnable_model_dir), torch_dtype="fp32"),
            "llama3": GenerationEngine.load(str(learnable_model_dir), template="llama3", torch_dtype="fp32")}


def expected(engine: GenerationEngine, question: str = QUESTION) -> str:
    return engine.generate([[Message("user", question)]], GREEDY)[0].text


def words(text: str) -> str:
    return " ".join(text.split())


def test_answer_streams_into_the_history(engines):
    engine = engines["chatml"]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    updates = [[dict(m) for m in h] for h in answer(engine, "Be brief.", history, QUESTION, GREEDY)]
    assert len(updates) > 3 and all(u[:2] == history for u in updates)
    texts = [u[-1]["content"] for u in updates]
    assert all(later.startswith(earlier.strip()) for earlier, later in zip(texts, texts[1:]))
    conversation = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
                    Message("user", QUESTION)]
    assert texts[-1] == engine.generate([conversation], GREEDY)[0].text


def test_side_by_side_answers_with_every_model(engines):
    streams = [answer(engine, "", [], QUESTION, GREEDY) for engine in engines.values()]
    *_, final = side_by_side(streams)
    assert [h[-1]["content"] for h in final] == [expected(e) for e in engines.values()]
    assert expected(engines["chatml"]) != expected(engines["llama3"])


def test_web_refuses_the_network_without_a_login(learnable_model_dir, capsys):
    assert main(["web", "--model", str(learnable_model_dir), "--host", "0.0.0.0"]) == 2
    assert "--auth USER:PASSWORD" in capsys.readouterr().err


RECORD_BOT_TEXT = """selector => {
    window.seen = window.seen || {};
    const root = document.querySelector(selector);
    const seen = window.seen[selector] = [];
    new MutationObserver(() => {
        const bots = root.querySelectorAll('[data-testid="bot"]');
        if (bots.length) seen.push(bots[bots.length - 1].innerText);
    }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def record_bot_text(page, selector: str) -> None:
    page.locator(selector).wait_for()  # Gradio renders after the page has loaded
    page.evaluate(RECORD_BOT_TEXT, selector)


SHOWS = "([selector, text]) => (window.seen[selector] || []).some(t => t.split(/\\s+/).join(' ').trim() === text)"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it)")
def test_browser_chat_streams_an_answer_and_compares_two_models(engines, tmp_path):
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = build_ui(engines, "", GREEDY)
    launch(ui, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)  # the system's; never a download
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            record_bot_text(page, "#chat")
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#question textarea").press("Enter")
            answer_text = words(expected(engines["chatml"]))
            page.wait_for_function(SHOWS, arg=["#chat", answer_text], timeout=60_000)
            seen = [words(t) for t in page.evaluate("window.seen['#chat']")]
            partial = {t for t in seen if t and t != answer_text}
            assert partial and all(answer_text.startswith(t) for t in partial), seen  # it streamed in
            page.screenshot(path=tmp_path / "web-chat.png", full_page=True)

            page.get_by_role("tab", name="Compare").click()
            record_bot_text(page, "#compare-0")
            record_bot_text(page, "#compare-1")
            page.locator("#compare-question textarea").fill(QUESTION)
            page.locator("#compare-question textarea").press("Enter")
            for index, engine in enumerate(engines.values()):
                page.wait_for_function(SHOWS, arg=[f"#compare-{index}", words(expected(engine))], timeout=60_000)
            page.screenshot(path=tmp_path / "web-compare.png", full_page=True)
            browser.close()
    finally:
        ui.close()
    assert (tmp_path / "web-chat.png").stat().st_size > 10_000
    assert (tmp_path / "web-compare.png").stat().st_size > 10_000
