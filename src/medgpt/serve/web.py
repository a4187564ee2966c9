"""The web UI (Gradio): a streaming chat with a system prompt and sampling controls, and a side-by-side tab that
answers one question with two models at once (e.g. the SFT and the PPO model of a pipeline run)."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from medgpt.data.records import Message
from medgpt.serve import check_exposure
from medgpt.serve.chat import DISCLAIMER
from medgpt.serve.engine import GenerationEngine, SamplingParams

History = list[dict]  # Gradio's chat messages: {"role": "user" | "assistant", "content": str or text parts}


def conversation(system: str, history: History) -> list[Message]:
    prefix = [Message("system", system.strip())] if system and system.strip() else []
    return prefix + [Message(m["role"], text_of(m["content"])) for m in history]


def text_of(content) -> str:
    """A Gradio message's content: our own string, or the text parts Gradio hands back from the browser."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def answer(engine: GenerationEngine, system: str, history: History, question: str,
           params: SamplingParams) -> Iterator[History]:
    """The history with the question and the answer so far, after each generated piece."""
    history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    for piece in engine.stream(conversation(system, history[:-1]), params):
        history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
        yield history
    history[-1] = {"role": "assistant", "content": history[-1]["content"].strip()}
    yield history


def side_by_side(streams: list[Iterator[History]]) -> Iterator[list[History | None]]:
    """Run several answer streams at once, each in its own thread; yield every stream's latest history.

    Closing this iterator (the user left the page) stops the streams, which stops their generation.
    """
    updates: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def pump(index: int, stream: Iterator[History]) -> None:
        try:
            for history in stream:
                updates.put((index, history))
                if stop.is_set():
                    break
        except Exception as err:  # noqa: BLE001 - re-raised in the UI's thread
            updates.put((index, err))
        finally:
            stream.close()
            updates.put((index, done))

    threads = [threading.Thread(target=pump, args=pair, daemon=True) for pair in enumerate(streams)]
    for thread in threads:
        thread.start()
    latest: list[History | None] = [None] * len(streams)
    running = len(streams)
    try:
        while running:
            index, value = updates.get()
            if value is done:
                running -= 1
                continue
            if isinstance(value, Exception):
                raise value
            latest[index] = value
            yield list(latest)
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def build_ui(engines: dict[str, GenerationEngine], system: str = "", params: SamplingParams | None = None):
    """The Gradio app: a Chat tab (any of the models), and a Compare tab when two models are given."""
    import gradio as gr

    params = params or SamplingParams()
    names = list(engines)

    def options(temperature, top_p, max_new_tokens) -> SamplingParams:
        return SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=params.top_k, repetition_penalty=params.repetition_penalty)

    def chat(text, history, name, system_prompt, *sampling):
        if not text.strip():
            yield history, ""
            return
        for updated in answer(engines[name], system_prompt, history, text, options(*sampling)):
            yield updated, ""

    def compare(text, left, right, system_prompt, *sampling):
        if not text.strip():
            yield left, right, ""
            return
        streams = [answer(engines[name], system_prompt, history, text, options(*sampling))
                   for name, history in zip(names, (left, right))]
        for latest in side_by_side(streams):
            yield latest[0] or left, latest[1] or right, ""

    def board(label: str, elem_id: str):
        return gr.Chatbot(label=label, elem_id=elem_id, height=420, feedback_options=None, buttons=["copy_all"])

    with gr.Blocks(title="medgpt", analytics_enabled=False) as ui:
        gr.Markdown(f"## medgpt\n{DISCLAIMER}")
        with gr.Tab("Chat"):
            model = gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1)
            chatbot = board("Conversation", "chat")
            question = gr.Textbox(placeholder="Ask a medical question and press Enter", show_label=False,
                                  elem_id="question")
            clear = gr.Button("New conversation", size="sm")
        if len(names) == 2:
            with gr.Tab("Compare"):
                with gr.Row():
                    boards = [board(name, f"compare-{i}") for i, name in enumerate(names)]
                compare_question = gr.Textbox(placeholder="One question, both models answer side by side",
                                              show_label=False, elem_id="compare-question")
                compare_clear = gr.Button("New comparison", size="sm")
        with gr.Row():
            system_box = gr.Textbox(system, label="System prompt", lines=2, scale=2, elem_id="system")
            with gr.Column(scale=1):
                temperature = gr.Slider(0, 2, params.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, params.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, 4096, params.max_new_tokens, step=1, label="Max new tokens")
        settings = [system_box, temperature, top_p, max_new_tokens]

        question.submit(chat, [question, chatbot, model, *settings], [chatbot, question])
        clear.click(lambda: [], None, chatbot)
        model.change(lambda: [], None, chatbot)
        if len(names) == 2:
            compare_question.submit(compare, [compare_question, *boards, *settings], [*boards, compare_question])
            compare_clear.click(lambda: ([], []), None, boards)
    return ui


def check_web_exposure(host: str, auth: tuple[str, str] | None) -> None:
    check_exposure(host, auth, "set a login with --auth USER:PASSWORD (or MEDGPT_WEB_AUTH)")


def launch(ui, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None, block: bool = True):
    """Serve the UI; beyond loopback a login is required (anyone on the network could use the model)."""
    import gradio as gr

    check_web_exposure(host, auth)
    # System fonts only: the default theme fetches web fonts, which fails or stalls on an offline machine.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    ui.queue(default_concurrency_limit=4, max_size=64)
    return ui.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block, theme=theme,
                     show_error=True, ssr_mode=False, quiet=not block, footer_links=[])
